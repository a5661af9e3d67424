"""The older name of :mod:`tying.site` (the base of a site's wrapper), kept so that ``from tying.adapter import
SiteAdapter`` goes on working; new code imports from :mod:`tying.site`."""

from .shared_down import SharedDown, link_shared_down
from .site import SiteAdapter

__all__ = ["SharedDown", "SiteAdapter", "link_shared_down"]
