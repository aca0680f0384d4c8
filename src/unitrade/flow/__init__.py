"""Flow control (docs/architecture.md, Flow control): rate limits in layers (limits.py,
limiter.py, redis_limiter.py), overload protection (overload.py), circuit breakers
(breaker.py) and degradation switches (switches.py), put together for a region by
control.py. The rules they apply are part of the routing rule (topology/flow_rules.py).

It knows neither HTTP nor SQL: the gateway and the services call it.
"""
