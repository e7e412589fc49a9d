"""A local stand-in for the ModelScope hub: the endpoints modelscope's own client (modelscope 1.40 /
modelscope-hub 0.5) calls to log in, create a model repo and upload a folder (LFS batch, blob PUT, commit).
The client is pointed at it through its own MODELSCOPE_ENDPOINT setting. It keeps what it received."""
import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class Hub:
    def __init__(self):
        self.requests = []  # (method, path)
        self.repos = []  # the create-repo bodies
        self.blobs = {}  # sha256 -> bytes
        self.files = {}  # path in repo -> bytes (after the commit)
        self.tokens = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _any(self, method):
                path = urlparse(self.path).path
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                body = json.loads(raw) if raw[:1] in (b"{", b"[") else None
                hub.requests.append((method, path))
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Bearer "):
                    hub.tokens.add(auth[7:])
                ok = lambda data: self._send(200, {"Code": 200, "Success": True, "Message": "ok", "Data": data})  # noqa: E731
                if method == "POST" and path == "/api/v1/login":
                    hub.tokens.add(body.get("AccessToken"))
                    return ok({"AccessToken": "git-token", "Username": "tester"})
                if method == "GET" and path.endswith("/users/me"):
                    return ok({"Username": "tester"})
                if method == "POST" and path == "/api/v1/models":
                    hub.repos.append(body)
                    return ok({})
                if path.endswith("/info/lfs/objects/batch"):
                    host = self.headers["Host"]
                    return ok({"objects": [{**o, "actions": {"upload": {"href": f"http://{host}/blob/{o['oid']}"}}}
                                           for o in body.get("objects", [])]})
                if method == "PUT" and path.startswith("/blob/"):
                    hub.blobs[path.rsplit("/", 1)[1]] = raw
                    return self._send(200, {})
                if "/commit/" in path:
                    for a in body.get("actions", []):
                        if a.get("encoding") == "base64":
                            hub.files[a["path"]] = base64.b64decode(a["content"])
                        else:
                            hub.files[a["path"]] = hub.blobs.get(a.get("sha256"), b"")
                    return ok({"CommitId": "c0ffee"})
                return self._send(404, {"Code": 404, "Success": False, "Message": f"no route {method} {path}"})

            def do_GET(self):
                self._any("GET")

            def do_POST(self):
                self._any("POST")

            def do_PUT(self):
                self._any("PUT")

            def do_HEAD(self):
                self._any("HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sha(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
