"""The collection explorer: a static web site of every painting's neighbours and a map.

``build`` writes ``<data-dir>/site/`` (pages rendered by Jinja2 with auto-escaping, data shipped as
``<script src>`` files so the site opens from ``file://``), ``records`` turns manifest rows into
what a page shows, ``thumbs`` makes the thumbnails. Nothing on a page loads from the network.
"""
from .build import SiteConfig, SiteSummary, build_site

__all__ = ["SiteConfig", "SiteSummary", "build_site"]
