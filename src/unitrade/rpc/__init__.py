"""Internal calls between regions: signed HTTP on the regions' internal API. The route types
(`center`: to the owner of the center cell; `global`: to the owner of the global cell; a
call whose owner is this region runs in-process, no socket) are services/remote.py's."""
