"""Composer: model surgery and fusion (filled in by the routers / composer issue)."""
