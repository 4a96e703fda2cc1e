# -*- coding: utf-8 -*-
# Copyright: lanyard.machine_id contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Diagnostics HTTP server (``diag_addr``): ``/livez``, ``/readyz`` and ``/metrics`` (Prometheus text).

The server only reads a snapshot the service loop publishes (counters, expiry times, destination paths,
the last error message); it never reads the storage or destination files, holds no credential, and
changes no state: only GET is served (any other method gets 405), unknown paths get 404, and a client
that sends nothing is dropped after ``request_timeout`` seconds."""

from __future__ import annotations

import json
import threading
from typing import Callable, Dict, Optional, Sequence, Tuple

from machine_id_agent.errors import ConfigError

PREFIX = "machine_id_agent_"

# The task labels follow tbot's (lib/tbot/internal/loop.go: service and name), with the values tbot gives the
# same tasks; an output's series also carry destination and kubernetes_cluster, as seconds_to_expiry does.
IDENTITY_TASK = {"service": "identity", "name": "bot-identity-renewal"}
OUTPUT_TASK = {"service": "kubernetes-output", "name": "output-renewal"}
# tbot buckets its successful iterations by the retries before the success (0..5); ours by the failed
# iterations of the task directly before it (the agent retries a failed cycle as a new one).
RETRY_BUCKETS: Tuple[float, ...] = (0, 1, 2, 3, 4, 5)
# one task of one cycle: a renewal takes about a second; a server that does not answer takes tens of seconds
DURATION_BUCKETS: Tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Histogram:
    """Cumulative bucket counts, sum and count: what the text format needs and nothing else."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.buckets = [0] * len(self.bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, le in enumerate(self.bounds):
            if v <= le:
                self.buckets[i] += 1
        self.count += 1
        self.sum += v

    def view(self) -> Dict:
        return {"bounds": list(self.bounds), "buckets": list(self.buckets), "count": self.count, "sum": self.sum}


class TaskStats:
    """Iterations of one task (the bot identity, or one output): one per renewal cycle that ran it or should have."""

    def __init__(self, labels: Dict[str, str]):
        self.labels = dict(labels)
        self.iterations = 0
        self.failed = 0
        self.failed_in_a_row = 0
        self.successful = Histogram(RETRY_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)

    def record(self, ok: bool, seconds: Optional[float]) -> None:
        """``seconds`` is None for an output the cycle never reached (the identity step failed): it counts as a
        failed iteration, but took no time."""
        self.iterations += 1
        if ok:
            self.successful.observe(self.failed_in_a_row)
            self.failed_in_a_row = 0
        else:
            self.failed += 1
            self.failed_in_a_row += 1
        if seconds is not None:
            self.duration.observe(max(0.0, seconds))

    def view(self) -> Dict:
        return {"labels": dict(self.labels), "iterations": self.iterations, "failed": self.failed,
                "successful": self.successful.view(), "duration": self.duration.view()}


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(snap: Dict) -> str:
    """Prometheus text exposition (version 0.0.4) from a service snapshot."""
    lines = []

    def sample(name, labels, value):
        lab = ",".join('%s="%s"' % (k, _esc(v)) for k, v in labels.items())
        lines.append("%s%s%s %s" % (PREFIX, name, ("{%s}" % lab) if lab else "", _num(value)))

    def metric(name, kind, help_, samples):
        lines.append("# HELP %s%s %s" % (PREFIX, name, help_))
        lines.append("# TYPE %s%s %s" % (PREFIX, name, kind))
        for labels, value in samples:
            sample(name, labels, value)

    def histogram(name, help_, series):
        lines.append("# HELP %s%s %s" % (PREFIX, name, help_))
        lines.append("# TYPE %s%s histogram" % (PREFIX, name))
        for labels, h in series:
            for le, n in zip(h["bounds"], h["buckets"]):
                sample(name + "_bucket", dict(labels, le=_num(float(le))), n)
            sample(name + "_bucket", dict(labels, le="+Inf"), h["count"])
            sample(name + "_sum", labels, float(h["sum"]))
            sample(name + "_count", labels, h["count"])

    metric("renewals_total", "counter", "Successful renewal cycles (identity and all outputs; a retry that wrote the outputs that had failed counts too).",
           [({}, snap.get("renewals", 0))])
    metric("renewal_failures_total", "counter", "Failed renewal cycles.", [({}, snap.get("failures", 0))])
    metric("ready", "gauge", "1 when every output holds a valid certificate and the last renewal succeeded.",
           [({}, 1 if snap.get("ready") else 0)])
    ident = snap.get("identity_seconds_to_expiry")
    if ident is not None:
        metric("identity_seconds_to_expiry", "gauge", "Seconds until the bot identity expires.", [({}, ident)])
    outs = [o for o in snap.get("outputs", []) if o.get("seconds_to_expiry") is not None]
    metric("seconds_to_expiry", "gauge", "Seconds until the certificate of each output expires.",
           [({"destination": o["destination"], "kubernetes_cluster": o.get("kubernetes_cluster", "")},
             o["seconds_to_expiry"]) for o in outs])
    multi = [o for o in snap.get("outputs", []) if o.get("kubernetes_clusters") is not None]
    if multi:
        # kubernetes/v2 outputs: seconds_to_expiry above is the soonest of the output's clusters; these name each
        metric("selected_clusters", "gauge",
               "Kubernetes clusters the selectors of each kubernetes/v2 output selected at its last renewal.",
               [({"destination": o["destination"]}, len(o["kubernetes_clusters"])) for o in multi])
        metric("cluster_seconds_to_expiry", "gauge",
               "Seconds until the certificate of each selected cluster of a kubernetes/v2 output expires.",
               [({"destination": o["destination"], "kubernetes_cluster": c}, secs)
                for o in multi for c, secs in sorted((o.get("cluster_seconds_to_expiry") or {}).items())])
    if snap.get("last_success_unix") is not None:
        metric("last_success_timestamp_seconds", "gauge", "Unix time of the last successful renewal.",
               [({}, snap["last_success_unix"])])
    watch = snap.get("ca_watch")
    if watch is not None:
        metric("ca_watch_up", "gauge", "1 while the watch on the cluster's certificate authorities is open.",
               [({}, 1 if watch.get("watching") else 0)])
        metric("ca_rotation_renewals_total", "counter", "Renewals of the identity and outputs for a CA rotation step.",
               [({}, watch.get("rotation_renewals", 0))])
    tasks = snap.get("tasks") or []
    if tasks:
        metric("task_iterations_total", "counter",
               "Iterations of each task (bot identity renewal, each output), one per renewal cycle; as tbot's.",
               [(t["labels"], t["iterations"]) for t in tasks])
        metric("task_iterations_failed_total", "counter",
               "Iterations of each task that failed (an output a failed cycle did not reach counts); "
               "tbot_task_iterations_failed.",
               [(t["labels"], t["failed"]) for t in tasks])
        histogram("task_iterations_successful",
                  "Successful iterations of each task, bucketed by the failed iterations right before; as tbot's.",
                  [(t["labels"], t["successful"]) for t in tasks])
        histogram("task_iteration_duration_seconds",
                  "Time one iteration of each task took, whatever its outcome; as tbot's.",
                  [(t["labels"], t["duration"]) for t in tasks])
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class DiagServer:
    def __init__(self, addr: str, snapshot: Callable[[], Dict], request_timeout: float = 10.0):
        # here, not at the top: `status` and the other short commands import this module without serving
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        host, _sep, port = addr.rpartition(":")
        host = host.strip("[]")
        self.snapshot = snapshot
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "machine-id-agent"
            timeout = request_timeout  # a connection that sends nothing does not hold a thread forever

            def log_message(self, *args):  # quiet: the journal is for the agent's own events
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                snap = outer.snapshot()
                if path == "/livez":
                    code, body, ctype = (200 if snap.get("alive", True) else 503), {"status": "ok" if snap.get("alive", True) else "stalled"}, "json"
                elif path == "/readyz":
                    ok = bool(snap.get("ready"))
                    code, ctype = (200 if ok else 503), "json"
                    body = {"status": "ready" if ok else "not ready", "reason": snap.get("reason") or "",
                            "outputs": snap.get("outputs", [])}
                elif path == "/metrics":
                    code, body, ctype = 200, render_metrics(snap), "text"
                else:
                    code, body, ctype = 404, {"error": "not found; try /livez, /readyz or /metrics"}, "json"
                if ctype == "json":
                    data = (json.dumps(body, default=str) + "\n").encode()
                    content_type = "application/json"
                else:
                    data = body.encode()
                    content_type = "text/plain; version=0.0.4; charset=utf-8"
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read_only(self):
                data = b'{"error": "read-only endpoint; use GET /livez, /readyz or /metrics"}\n'
                self.send_response(405)
                self.send_header("Allow", "GET")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = _read_only

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = __import__("socket").AF_INET6 if ":" in host else __import__("socket").AF_INET

        try:
            self.httpd = Server((host, int(port)), Handler)
        except OSError as e:
            raise ConfigError("diag_addr: cannot listen on %s (%s); pick a free port or remove diag_addr"
                              % (addr, e.strerror or e)) from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="diag", daemon=True)

    @property
    def address(self) -> Tuple[str, int]:
        return self.httpd.server_address[:2]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
