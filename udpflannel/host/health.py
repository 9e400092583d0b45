"""The agent's HTTP endpoints: /healthz, /readyz (200 only once subnet.env and rules are in place) and
/metrics (Prometheus text: datapath counters and drops by reason), plus optional JSON views (e.g. /wireguard
for `udpflannel wg show`). Off unless --healthz-port is set."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

METRIC_PREFIX = "udpflannel_"


def render_metrics(counters: Mapping[str, int]) -> str:
    """Counters named `drop_<reason>` become udpflannel_drops_total{reason="..."}; others keep their name."""
    lines: list[str] = []
    drops = {k[5:]: v for k, v in counters.items() if k.startswith("drop_")}
    for name in sorted(k for k in counters if not k.startswith("drop_")):
        metric = f"{METRIC_PREFIX}{name}"
        lines.append(f"# TYPE {metric} {'counter' if name.endswith('_total') else 'gauge'}")
        lines.append(f"{metric} {counters[name]}")
    if drops:
        lines.append(f"# TYPE {METRIC_PREFIX}drops_total counter")
        lines.extend(f'{METRIC_PREFIX}drops_total{{reason="{r}"}} {drops[r]}' for r in sorted(drops))
    return "\n".join(lines) + "\n"


class _ServerV6(ThreadingHTTPServer):
    address_family = socket.AF_INET6  # --healthz-ip may be an IPv6 address, as flanneld takes it


class HealthServer:
    """Serves the three endpoints from a daemon thread; `ready` flips /readyz to 200."""

    def __init__(
        self,
        host: str,
        port: int,
        counters: Callable[[], Mapping[str, int]],
        json_views: Mapping[str, Callable[[], object]] | None = None,
    ) -> None:
        self.ready = threading.Event()
        views = dict(json_views or {})
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._reply(200, "ok\n")
                elif path == "/readyz":
                    ok = outer.ready.is_set()
                    self._reply(200 if ok else 503, "ok\n" if ok else "not ready\n")
                elif path == "/metrics":
                    self._reply(200, render_metrics(counters()), "text/plain; version=0.0.4")
                elif path in views:
                    try:
                        body = json.dumps(views[path]())
                    except Exception as exc:  # a view of a dying backend must not take the server down
                        self._reply(503, json.dumps({"error": str(exc)}) + "\n", "application/json")
                        return
                    self._reply(200, body + "\n", "application/json")
                else:
                    self._reply(404, "not found\n")

            def _reply(self, code: int, body: str, ctype: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # quiet by default
                pass

        # Binds here, so a port in use or an address the node lacks is an OSError for the caller to report.
        self._server = (_ServerV6 if ":" in host else ThreadingHTTPServer)((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="healthz", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
