"""``hairdiff comfy-run``: run a HairDiff workflow (API format) on a ComfyUI server over HTTP.

Uploads the photo, sketch and matte (and an optional protect picture), writes their names into
the graph's Load Image nodes (found by their titles "Photo", "Sketch", "Matte", "Protect"),
applies ``--set node.input=value`` edits (node = id or title), submits the graph, follows its
progress (ComfyUI's websocket, or polling ``/history`` when the websocket is unavailable), and
downloads the output images. ComfyUI's validation errors become one readable line per problem.
HTTP with the standard library only (a plain ``--protect`` mask is converted with the pack's
image code first); it never imports ComfyUI.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import mimetypes
import os
import re
import socket
import struct
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from hairdiff_core.errors import HairDiffError, InputError

logger = logging.getLogger(__name__)

ROLES = ("photo", "sketch", "matte", "protect")
#: Roles a workflow may keep as shipped: its Protect node loads the sample photo's face, right only
#: for the sample photo (``--protect`` swaps it).
OPTIONAL_ROLES = ("protect",)
UPLOAD_SUBFOLDER = "hairdiff"


class ComfyServerError(HairDiffError):
    """The server could not be reached, refused the graph, or failed while running it."""


# --------------------------------------------------------------------------------------------
# Graph editing (pure functions, tested without a server)
# --------------------------------------------------------------------------------------------


def load_workflow(path: str | os.PathLike) -> dict[str, Any]:
    from hairdiff_core.fileio import check_input_path

    p = check_input_path(path, "workflow")
    try:
        graph = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"workflow {p} is not valid JSON: {exc}") from exc
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise InputError(
            f"workflow {p} is in ComfyUI's UI format; comfy-run needs the API format "
            f"(workflows/api/, or in ComfyUI: Workflow > Export (API))"
        )
    if (
        not isinstance(graph, dict)
        or not graph
        or not all(isinstance(v, dict) and "class_type" in v for v in graph.values())
    ):
        raise InputError(f"workflow {p} is not an API-format ComfyUI graph ({{node_id: {{class_type, inputs}}}})")
    return graph


def _title(node: dict[str, Any]) -> str:
    return str(node.get("_meta", {}).get("title", ""))


def find_node(graph: dict[str, Any], ref: str) -> str:
    """A node id from an id or a (case-insensitive) title."""
    if ref in graph:
        return ref
    matches = [nid for nid, node in graph.items() if _title(node).lower() == ref.lower()]
    if len(matches) == 1:
        return matches[0]
    titles = sorted({_title(n) for n in graph.values() if _title(n)})
    if not matches:
        raise InputError(f"no node with id or title {ref!r} in the workflow; titles: {titles}")
    raise InputError(f"{len(matches)} nodes are titled {ref!r} ({matches}); use a node id")


def role_nodes(graph: dict[str, Any]) -> dict[str, str]:
    """{"photo"|"sketch"|"matte"|"protect": node id} for Load Image nodes titled after their role."""
    out: dict[str, str] = {}
    for nid, node in graph.items():
        if node.get("class_type") != "LoadImage":
            continue
        title = _title(node).lower()
        for role in ROLES:
            if role in title:
                if role in out:
                    raise InputError(f"two Load Image nodes ({out[role]}, {nid}) are titled for the {role}")
                out[role] = nid
    return out


def parse_value(text: str) -> Any:
    """--set values: JSON when they parse (numbers, true/false, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_sets(graph: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    graph = json.loads(json.dumps(graph))
    for item in sets:
        target, eq, value = item.partition("=")
        ref, dot, name = target.rpartition(".")
        if not eq or not dot or not ref or not name:
            raise InputError(
                f"--set {item!r}: expected NODE.INPUT=VALUE (NODE = id or title), e.g. 'HairDiff Scheduler.steps=8'"
            )
        nid = find_node(graph, ref)
        inputs = graph[nid].setdefault("inputs", {})
        if name not in inputs:
            raise InputError(
                f"--set {item!r}: node {nid} ({graph[nid]['class_type']}) has no input {name!r}; "
                f"it has {sorted(inputs)}"
            )
        if isinstance(inputs[name], list):
            raise InputError(f"--set {item!r}: input {name!r} of node {nid} is a link, not a value")
        inputs[name] = parse_value(value)
    return graph


def format_validation_error(body: dict[str, Any], graph: dict[str, Any]) -> str:
    """ComfyUI's /prompt 400 answer -> readable lines naming node, input and problem.

    A node's ``validate_inputs`` answer is one message, but ComfyUI repeats it once for every
    input the method takes ("custom_validation_failed", details "<input> - <message>"); it is
    shown once, on the node, since the message itself names the inputs that are wrong.
    """
    lines = []
    error = body.get("error") or {}
    if isinstance(error, dict) and error.get("message"):
        detail = f": {error['details']}" if error.get("details") else ""
        lines.append(f"{error['message']}{detail}")
    for nid, info in (body.get("node_errors") or {}).items():
        node = graph.get(str(nid), {})
        name = f"node {nid} ({info.get('class_type') or node.get('class_type', '?')}"
        name += f" '{_title(node)}')" if _title(node) else ")"
        custom_seen = set()
        for err in info.get("errors", []):
            inp = (err.get("extra_info") or {}).get("input_name")
            if err.get("type") == "custom_validation_failed" and " - " in (err.get("details") or ""):
                text = err["details"].partition(" - ")[2]
                if text not in custom_seen:
                    custom_seen.add(text)
                    lines.append(f"{name}: {text}")
                continue
            where = f" input '{inp}'" if inp else ""
            detail = err.get("details") or ""
            lines.append(
                f"{name}{where}: {err.get('message', err.get('type', 'error'))}"
                + (f" ({detail})" if detail and detail not in err.get("message", "") else "")
            )
    return "\n".join(lines) or json.dumps(body)[:2000]


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


#: The command-line flag of each role's picture (the photo's is --image, as in ``generate``).
ROLE_FLAGS = {"photo": "--image", "sketch": "--sketch", "matte": "--matte", "protect": "--protect"}


def check_server_url(server: str) -> str:
    """``--server`` as a base URL (``http://`` added to a bare ``host:port``), or ``InputError``
    naming what is wrong with it: checked up front, because urllib answers a port over 65535
    or a space with a traceback and an ``ftp://`` with "connection refused", which read as
    "start ComfyUI" when the address itself is the mistake."""
    example = "e.g. --server http://127.0.0.1:8188"
    text = str(server)
    if not text.strip():
        raise InputError(f"--server is empty; give ComfyUI's address, {example}", input="server")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise InputError(f"--server {text!r} contains a space or control character; {example}", input="server")
    if "://" not in text:
        text = "http://" + text
    try:
        url = urllib.parse.urlsplit(text.rstrip("/"))
    except ValueError as exc:
        raise InputError(f"--server {server!r} is not a valid address ({exc}); {example}", input="server") from None
    # urllib's own port check says "0-65535" and names no value; the raw digits are read here.
    raw_port = re.search(r":([^:\]]*)$", url.netloc.rpartition("@")[2])
    port = raw_port.group(1) if raw_port else None
    if port is not None and not port.isdigit():
        raise InputError(f"--server {server!r}: the port {port!r} is not a number; {example}", input="server")
    if url.scheme.lower() not in ("http", "https"):
        raise InputError(
            f"--server {server!r}: ComfyUI's API is served over http:// or https://, not {url.scheme}://; {example}",
            input="server",
        )
    if not url.hostname:
        raise InputError(f"--server {server!r} has no host name; {example}", input="server")
    if port is not None and not 1 <= int(port) <= 65535:
        raise InputError(f"--server {server!r}: the port must be 1 to 65535, got {port}; {example}", input="server")
    if url.query or url.fragment:
        raise InputError(f"--server {server!r}: give the address alone, without ?query or #fragment", input="server")
    return urllib.parse.urlunsplit((url.scheme.lower(), url.netloc, url.path, "", ""))


class ComfyClient:
    def __init__(self, server: str, timeout: float = 60.0):
        self.server = check_server_url(server)
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _request(
        self, method: str, path: str, data: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            url = urllib.parse.urlsplit(self.server)
            host, port = url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)
            raise ComfyServerError(
                f"cannot reach ComfyUI at {self.server} ({getattr(exc, 'reason', exc)}); start it there "
                f"(python main.py --listen {host} --port {port}) or pass --server with its address"
            ) from exc

    def _json(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        data = json.dumps(payload).encode() if payload is not None else None
        status, body = self._request(method, path, data, {"Content-Type": "application/json"} if data else None)
        try:
            return status, json.loads(body.decode() or "null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return status, {"error": {"message": body[:500].decode(errors="replace")}}

    def upload_image(self, path: str | os.PathLike, subfolder: str = UPLOAD_SUBFOLDER) -> str:
        from hairdiff_core.fileio import check_input_path

        p = check_input_path(path, "image")
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
        parts = []
        for key, value in (("type", "input"), ("subfolder", subfolder), ("overwrite", "true")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{p.name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode()
            + p.read_bytes()
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        status, body = self._request(
            "POST", "/upload/image", b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        if status != 200:
            raise ComfyServerError(f"uploading {p} failed: HTTP {status}: {body[:300].decode(errors='replace')}")
        info = json.loads(body)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def submit(self, graph: dict[str, Any]) -> str:
        status, body = self._json("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})
        if status != 200:
            raise ComfyServerError("ComfyUI refused the workflow:\n" + format_validation_error(body or {}, graph))
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        status, body = self._json("GET", f"/history/{prompt_id}")
        if status != 200:
            raise ComfyServerError(f"/history/{prompt_id} answered HTTP {status}")
        return (body or {}).get(prompt_id)

    def download(self, image: dict[str, Any]) -> bytes:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        status, body = self._request("GET", f"/view?{query}")
        if status != 200:
            raise ComfyServerError(f"downloading {image.get('filename')} failed: HTTP {status}")
        return body

    # -- progress ---------------------------------------------------------------------------
    def open_progress(self) -> _WebSocket | None:
        try:
            return _WebSocket.connect(self.server, f"/ws?clientId={self.client_id}", timeout=self.timeout)
        except (OSError, ComfyServerError) as exc:
            logger.debug("no websocket (%s); following progress by polling", exc)
            return None


class _WebSocket:
    """Just enough of RFC 6455 to read ComfyUI's status messages (text frames, unmasked from the server)."""

    def __init__(self, sock: socket.socket, buffered: bytes):
        self.sock = sock
        self.buf = buffered

    @classmethod
    def connect(cls, server: str, path: str, timeout: float) -> _WebSocket:
        url = urllib.parse.urlparse(server)
        if url.scheme != "http":
            raise ComfyServerError("websocket progress only over plain http")
        sock = socket.create_connection((url.hostname, url.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {url.hostname}:{url.port or 80}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            sock.close()
            raise ComfyServerError("websocket upgrade refused")
        return cls(sock, rest)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_json(self, timeout: float) -> dict[str, Any] | None:
        """The next text message as JSON; None on timeout. Binary frames (previews) are skipped."""
        self.sock.settimeout(timeout)
        try:
            while True:
                b0, b1 = self._read(2)
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._read(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._read(8))[0]
                mask = self._read(4) if b1 & 0x80 else None
                payload = self._read(length)
                if mask:
                    payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
                if opcode == 8:
                    raise ConnectionError("websocket closed by the server")
                if opcode == 1:
                    return json.loads(payload.decode())
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def kept_protect_warning(graph: dict[str, Any], roles_given) -> str | None:
    """A line for a workflow whose Protect node keeps its shipped mask while the photo is swapped."""
    roles = role_nodes(graph)
    if "protect" in roles and "protect" not in roles_given and "photo" in roles_given:
        shipped = graph[roles["protect"]]["inputs"].get("image")
        return (
            f"the workflow's Protect node keeps its shipped picture ({shipped}: the sample photo's face, "
            "transparent), drawn for the sample photo; pass --protect FILE for your photo (a picture with "
            "the protected part transparent, or a plain mask, white = keep)"
        )
    return None


def protect_file(path: str | os.PathLike, tmp_dir: str | os.PathLike) -> Path:
    """The file to upload for ``--protect``, read as the templates read it (Load Image's MASK, 1 - alpha).

    A picture with transparency (the mask editor's way: transparent = protected) is uploaded as it
    is; a plain mask (white = keep, no transparency) is converted to a PNG in ``tmp_dir`` with the
    white part transparent, so Load Image gives the same MASK. ``hairdiff_core.method.mask.protect_mask``
    is the one reading of both.
    """
    from hairdiff_core.data.imageio import load_image, save_image
    from hairdiff_core.method.mask import has_transparency, protect_mask, protect_picture

    p = Path(path)
    picture = load_image(p)
    if float(protect_mask(picture).amax()) <= 0.5:
        logger.warning(
            "--protect %s protects nothing: no transparent part and no white (transparent or white = keep)", p
        )
    if has_transparency(picture):
        return p
    return save_image(protect_picture(picture)[0], Path(tmp_dir) / f"{p.stem}_protect.png")


def prepare_graph(graph: dict[str, Any], uploaded: dict[str, str], sets: list[str]) -> dict[str, Any]:
    """Write uploaded file names into the role nodes, then apply --set edits."""
    roles = role_nodes(graph)
    graph = json.loads(json.dumps(graph))
    for role, name in uploaded.items():
        if role not in roles:
            raise InputError(
                f"{ROLE_FLAGS[role]} was given but the workflow has no Load Image node titled '{role.title()}'; "
                f"titled ones: {sorted(roles) or 'none'}"
            )
        graph[roles[role]]["inputs"]["image"] = name
    missing = [r for r in roles if r not in uploaded and r not in OPTIONAL_ROLES]
    if missing:
        flags = " ".join(f"{ROLE_FLAGS[r]} FILE" for r in missing)
        raise InputError(f"the workflow loads the {', '.join(missing)} from Load Image nodes; pass {flags}")
    return apply_sets(graph, sets)


def follow(
    client: ComfyClient, prompt_id: str, ws: _WebSocket | None, timeout: float, poll: float = 0.5
) -> dict[str, Any]:
    """Wait for the prompt to finish, logging progress; return its history entry."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if ws is not None:
            try:
                msg = ws.recv_json(timeout=poll)
            except (ConnectionError, OSError, ValueError) as exc:
                logger.debug("websocket ended (%s); polling", exc)
                ws = None
                msg = None
            if msg and (msg.get("data") or {}).get("prompt_id") in (prompt_id, None):
                kind, data = msg.get("type"), msg.get("data") or {}
                if kind == "progress":
                    logger.info("node %s: step %s/%s", data.get("node"), data.get("value"), data.get("max"))
                elif kind == "executing" and data.get("node") is not None and data.get("node") != last:
                    last = data.get("node")
                    logger.info("running node %s", last)
        else:
            time.sleep(poll)
        entry = client.history(prompt_id)
        if entry is not None and (entry.get("status") or {}).get("completed") is not None:
            return entry
        if entry is not None and entry.get("outputs") and not entry.get("status"):
            return entry
    raise ComfyServerError(f"the workflow did not finish within {timeout:.0f} s (prompt {prompt_id}); raise --timeout")


def execution_error(entry: dict[str, Any]) -> str | None:
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return None
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            # ComfyUI reports a custom node's exception by its module path
            # (/.../custom_nodes/pack.module.Class): the class name is what a user can read.
            kind_name = str(data.get("exception_type") or "error").rsplit(".", 1)[-1]
            return (
                f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                f"{kind_name}: {data.get('exception_message', '').strip()}"
            )
        if kind == "execution_interrupted":
            return "the workflow was interrupted (Cancel)"
    return "the workflow failed (see the ComfyUI console)"


def save_outputs(client: ComfyClient, entry: dict[str, Any], out_dir: Path) -> list[Path]:
    images = [img for node in (entry.get("outputs") or {}).values() for img in node.get("images", [])]
    wanted = [i for i in images if i.get("type") == "output"] or images
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    from hairdiff_core.fileio import atomic_write_bytes

    for img in wanted:
        target = out_dir / Path(img["filename"]).name
        atomic_write_bytes(target, client.download(img))
        saved.append(target)
    return saved


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address (default: %(default)s)")
    parser.add_argument(
        "--workflow", required=True, help="an API-format workflow, e.g. workflows/api/hairdiff_basic.json"
    )
    parser.add_argument("--image", help="the photo (uploaded into the Load Image node titled 'Photo')")
    parser.add_argument("--sketch", help="the sketch (into the node titled 'Sketch')")
    parser.add_argument(
        "--matte", help="the hair matte (into the node titled 'Matte'); not needed by matte-from-sketch workflows"
    )
    parser.add_argument(
        "--protect",
        help="what must not change, e.g. the face (into the node titled 'Protect'): a picture with that part "
        "transparent (as ComfyUI's mask editor saves it) or a plain mask, white = keep; the shorter-hair and "
        "draw-in-ComfyUI workflows otherwise keep the sample photo's face",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="edit an input; NODE is a node id or title, VALUE JSON or text (repeatable), "
        "e.g. --set 'HairDiff Scheduler.steps=8' --set 'Load Checkpoint.ckpt_name=sd3.5_medium.safetensors'",
    )
    parser.add_argument("--out", required=True, help="folder for the downloaded images")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds to wait for the result (default: %(default)s)"
    )


#: A week: a larger or non-finite --timeout is a typo (nan would wait for nothing at all).
TIMEOUT_BOUND_S = 7 * 24 * 3600.0


def run(args: argparse.Namespace) -> int:
    from hairdiff_core.checks import Bound, check_number

    check_server_url(args.server)
    check_number(args.timeout, Bound("--timeout", lo=0.0, lo_open=True, hi=TIMEOUT_BOUND_S, hint="seconds"), "timeout")
    graph = load_workflow(args.workflow)
    files = {role: getattr(args, ROLE_FLAGS[role][2:]) for role in ROLES}
    files = {role: path for role, path in files.items() if path}
    for path in files.values():
        if not Path(path).is_file():
            raise FileNotFoundError(2, "no such file", path)
    prepare_graph(graph, {role: "x" for role in files}, args.set)  # errors before any upload
    line = kept_protect_warning(graph, files)
    if line:
        logger.warning("%s", line)
    from hairdiff_core.fileio import check_writable_folder

    check_writable_folder(args.out, "comfy-run output")
    client = ComfyClient(args.server)
    with tempfile.TemporaryDirectory(prefix="hairdiff_protect_") as tmp:
        if "protect" in files:
            files["protect"] = protect_file(files["protect"], tmp)
        uploaded = {role: client.upload_image(path) for role, path in files.items()}
    graph = prepare_graph(graph, uploaded, args.set)
    ws = client.open_progress()
    try:
        prompt_id = client.submit(graph)
        logger.info("queued prompt %s on %s", prompt_id, client.server)
        entry = follow(client, prompt_id, ws, args.timeout)
    finally:
        if ws is not None:
            ws.close()
    failure = execution_error(entry)
    if failure:
        raise ComfyServerError(failure)
    saved = save_outputs(client, entry, Path(args.out))
    if not saved:
        raise ComfyServerError("the workflow finished without output images (does it end in Save Image?)")
    for path in saved:
        logger.info("saved %s", path)
    return 0
