"""A plugin that cannot be imported, as one whose kernel library is missing: the registry records it as broken,
with this reason, and finds every other backend as usual."""

raise RuntimeError("novainfer_raising needs libwarp, which is not installed")
