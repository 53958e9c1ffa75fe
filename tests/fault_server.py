"""
A real HTTP server on 127.0.0.1 for download tests and benchmarks, with switchable faults.

    with FaultServer({"/a.bin": data}) as srv:
        srv.faults["/a.bin"] = ["drop", "503", ("429", 1)]   # consumed one per GET, in order
        download(srv.url + "/a.bin", dest)

Faults: "drop" (reset the connection mid-body), "short" (close cleanly before Content-Length),
"503", ("429", seconds) with Retry-After. `ignore_range` answers every Range request with 200 and
the whole body; `rate` throttles each connection (bytes/s). Every GET is recorded in `log`.
"""

import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    def __init__(self, files=None, root=None, rate=None):
        self.files = dict(files or {})  # URL path -> bytes
        self.root = root  # or serve a directory tree
        self.rate = rate
        self.faults = {}
        self.ignore_range = False
        self.log = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    def requests_for(self, path):
        return [entry for entry in self.log if entry["path"] == path]

    def _body(self, path):
        if path in self.files:
            return self.files[path]
        if self.root:
            full = os.path.join(self.root, *path.lstrip("/").split("/"))
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    return f.read()
        return None

    def _next_fault(self, path):
        with self._lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None


def _make_handler(server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            path = self.path.split("?")[0]
            range_header = self.headers.get("Range")
            fault = server._next_fault(path)
            with server._lock:
                server.log.append({"path": path, "range": range_header, "fault": fault, "time": time.time()})
            body = server._body(path)
            if body is None:
                return self._status(404)
            if fault == "503":
                return self._status(503)
            if isinstance(fault, tuple) and fault[0] == "429":
                return self._status(429, {"Retry-After": str(fault[1])})
            start = 0
            if range_header and not server.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    return self._status(416, {"Content-Range": f"bytes */{len(body)}"})
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("Accept-Ranges", "none" if server.ignore_range else "bytes")
            self.send_header("Connection", "close")
            self.end_headers()
            payload = body[start:]
            if fault in ("drop", "short"):
                self._send(payload[: len(payload) // 2])
                if fault == "drop":  # let the client read what was sent, then reset (RST) the connection
                    time.sleep(0.2)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    os.close(self.connection.detach())
                self.close_connection = True
                return
            self._send(payload)

        def _status(self, code, headers=None):
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()

        def _send(self, data):
            step = 16384
            try:
                for i in range(0, len(data), step):
                    self.wfile.write(data[i : i + step])
                    if server.rate:
                        time.sleep(step / server.rate)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler
