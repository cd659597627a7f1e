"""The web console (issue 13): browse, search and a dashboard, served at ``/`` beside
``/dicom-web`` on the same port, with the same login and access rules.

Server-rendered pages (Jinja2 templates under ``templates/``), light JavaScript and
Chart.js (its UMD build vendored under ``static/vendor/``, MIT licence beside it): no
build step, nothing fetched from elsewhere at run time.
"""

from archive.web.console.pages import routes

__all__ = ["routes"]
