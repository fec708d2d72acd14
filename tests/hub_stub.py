"""A local stand-in for the Hugging Face Hub's HTTP API, enough for ``create_repo``, ``create_branch``
and ``upload_folder`` over the LFS protocol (the Xet protocol needs its CAS service, so tests disable
Xet). It keeps what was committed, and which LFS objects were uploaded, for the test to check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REGULAR_MAX = 10_000  # files larger than this go through LFS (the Hub's rule is similar in spirit)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private", "branches": {name: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}  # oid -> content
        self.lfs_uploads: list[str] = []  # oids in upload order (a resumed upload must not repeat them)
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = 0  # make the next N commits fail with 500 (an interrupted upload)


def _handler(state: HubState, base: list[str]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _json(self, code: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            state.requests.append(("POST", path))
            body = self._body()
            if path == "/api/repos/create":
                req = json.loads(body)
                rid = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                if rid in state.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": f"{base[0]}/{rid}"})
                private = req.get("visibility") == "private" or bool(req.get("private"))  # new and old clients
                state.repos[rid] = {"private": private, "branches": {"main": {}}}
                return self._json(200, {"url": f"{base[0]}/{rid}", "name": rid, "id": rid})
            if path == "/api/validate-yaml":  # the client checks a README's metadata before committing it
                return self._json(200, {"errors": [], "warnings": []})
            if path.endswith(".git/info/lfs/objects/batch"):
                req = json.loads(body)
                objects = []
                for o in req["objects"]:
                    entry = {"oid": o["oid"], "size": o["size"]}
                    if o["oid"] not in state.lfs:  # present objects get no action: that is what makes re-runs resume
                        entry["actions"] = {"upload": {"href": f"{base[0]}/lfs-upload/{o['oid']}"}}
                    objects.append(entry)
                return self._json(200, {"transfer": "basic", "objects": objects})
            parts = path.split("/")
            if path.startswith("/api/models/") and "/preupload/" in path:
                req = json.loads(body)
                mode = {f["path"]: "lfs" if f["size"] > REGULAR_MAX else "regular" for f in req["files"]}
                files = [{"path": p, "uploadMode": m, "shouldIgnore": False} for p, m in mode.items()]
                return self._json(200, {"files": files})
            if path.startswith("/api/models/") and "/branch/" in path:
                rid, branch = "/".join(parts[3:5]), parts[-1]
                branches = state.repos[rid]["branches"]
                branches.setdefault(branch, dict(branches["main"]))
                return self._json(200, {})
            if path.startswith("/api/models/") and "/commit/" in path:
                if state.fail_commits:
                    state.fail_commits -= 1
                    return self._json(500, {"error": "simulated outage"})
                rid, branch = "/".join(parts[3:5]), parts[-1]
                if rid not in state.repos or branch not in state.repos[rid]["branches"]:
                    return self._json(404, {"error": "Repository not found"})
                files = state.repos[rid]["branches"][branch]
                for line in body.splitlines():
                    item = json.loads(line)
                    v = item["value"]
                    if item["key"] == "file":
                        files[v["path"]] = base64.b64decode(v["content"])
                    elif item["key"] == "lfsFile":
                        if v["oid"] not in state.lfs:
                            return self._json(400, {"error": f"LFS object {v['oid']} was never uploaded"})
                        files[v["path"]] = state.lfs[v["oid"]]
                oid = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
                return self._json(200, {"commitUrl": f"{base[0]}/{rid}/commit/{oid}", "commitOid": oid})
            return self._json(404, {"error": f"stub has no POST {path}"})

        def do_PUT(self) -> None:  # noqa: N802
            state.requests.append(("PUT", self.path))
            body = self._body()
            oid = self.path.rsplit("/", 1)[-1]
            if hashlib.sha256(body).hexdigest() != oid:
                return self._json(400, {"error": "content does not match its oid"})
            state.lfs[oid] = body
            state.lfs_uploads.append(oid)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


class HubStub:
    """``with HubStub() as hub:`` serves on 127.0.0.1 (a free port); ``hub.endpoint`` is its URL."""

    def __init__(self) -> None:
        self.state = HubState()
        self._base: list[str] = [""]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state, self._base))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._base[0] = self.endpoint

    def __enter__(self) -> HubStub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
