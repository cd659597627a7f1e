#!/usr/bin/env python3
"""Serve the prebuilt OHIF viewer (npm ``@ohif/app``'s ``dist/``) pointed at the archive.

    python scripts/ohif_serve.py DIST_DIR --port 3000 --archive http://127.0.0.1:8080

OHIF is a single-page application: every path that is not a file of ``dist/`` gets
``index.html`` (``/viewer?StudyInstanceUIDs=...``), and ``/app-config.js`` is written
here (the file in ``dist/`` is left alone) with one DICOMweb data source:

- by default the archive's ``/dicom-web`` is proxied from this origin, as a site puts
  both behind one web server (the browser needs no CORS; the ``Host`` header is passed
  on, so the URLs the archive builds come back here);
- ``--direct``: the viewer talks to the archive's URL itself, which needs the archive's
  ``http.cors.allow_origins`` to name this origin.

``--user NAME:PASSWORD`` makes the proxy send these credentials (HTTP Basic) with each
request that has none: the viewer acts for that user, whose rules decide what it shows;
the password stays on this server, never in the page.

Each proxied request is logged to stderr with its status (``PROXY GET ... -> 200``).
"""
from __future__ import annotations

import argparse
import base64
import http.client
import mimetypes
import sys
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")

APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'archive',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'archive',
      configuration: {
        friendlyName: 'dicom-archive',
        name: 'archive',
        wadoUriRoot: '%(root)s',
        qidoRoot: '%(root)s',
        wadoRoot: '%(root)s',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video,pdf',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


class Handler(SimpleHTTPRequestHandler):
    archive: urllib.parse.SplitResult
    app_config: bytes
    authorization: str | None = None

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/dicom-web"):
            return self.proxy()
        if self.path.split("?", 1)[0] == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(self.app_config)))
            self.end_headers()
            self.wfile.write(self.app_config)
            return None
        if not Path(self.translate_path(self.path)).is_file():
            self.path = "/index.html"
        return super().do_GET()

    def do_POST(self) -> None:  # noqa: N802
        return self.proxy()

    def proxy(self) -> None:
        archive = self.archive
        connection = (http.client.HTTPSConnection if archive.scheme == "https"
                      else http.client.HTTPConnection)(archive.hostname, archive.port,
                                                       timeout=120)
        body = None
        if "Content-Length" in self.headers:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("connection", "accept-encoding")}
        if self.authorization and "Authorization" not in self.headers:
            headers["Authorization"] = self.authorization
        connection.request(self.command, self.path, body=body, headers=headers)
        answer = connection.getresponse()
        data = answer.read()
        self.send_response(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "date", "server",
                                    "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        connection.close()
        sys.stderr.write(f"PROXY {self.command} {self.path} -> {answer.status} "
                         f"{len(data)}B\n")
        sys.stderr.flush()

    def log_message(self, fmt: str, *args: object) -> None:
        pass  # the static files are many and dull; proxied requests are logged above


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dist", type=Path, help="OHIF's dist/ directory")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--archive", default="http://127.0.0.1:8080",
                   help="the archive's DICOMweb server (without /dicom-web)")
    p.add_argument("--direct", action="store_true",
                   help="the viewer calls the archive itself (needs its CORS setting)")
    p.add_argument("--user", help="NAME:PASSWORD the proxy sends (HTTP Basic)")
    a = p.parse_args()
    if a.user:
        if a.direct or ":" not in a.user:
            sys.exit("ohif_serve: --user NAME:PASSWORD, and only with the proxy")
        Handler.authorization = "Basic " + base64.b64encode(a.user.encode()).decode()
    if not (a.dist / "index.html").is_file():
        sys.exit(f"ohif_serve: no index.html in {a.dist}")
    archive = a.archive.rstrip("/")
    root = f"{archive}/dicom-web" if a.direct else f"http://{a.bind}:{a.port}/dicom-web"
    Handler.archive = urllib.parse.urlsplit(archive)
    Handler.app_config = (APP_CONFIG % {"root": root}).encode()
    server = ThreadingHTTPServer((a.bind, a.port), partial(Handler, directory=str(a.dist)))
    print(f"OHIF on http://{a.bind}:{a.port}/ -> {root}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
