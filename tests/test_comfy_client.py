"""hairdiff comfy-run against a small fake ComfyUI HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hairdiff_cli import comfy_client as C
from hairdiff_cli import main

GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}, "_meta": {"title": "Photo"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "sketch.png"}, "_meta": {"title": "Sketch"}},
    "3": {"class_type": "LoadImage", "inputs": {"image": "matte.png"}, "_meta": {"title": "Matte"}},
    "4": {
        "class_type": "HairDiff_Sampler",
        "inputs": {"steps": 28, "photo": ["1", 0]},
        "_meta": {"title": "HairDiff Sampler"},
    },
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "hairdiff"}},
}


class FakeComfy:
    def __init__(self, reject=None, fail=None):
        self.uploads: dict[str, bytes] = {}
        self.prompts: list[dict] = []
        self.reject = reject
        self.fail = fail
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body, ctype="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/upload/image":
                    ctype = self.headers["Content-Type"]
                    boundary = ctype.split("boundary=")[1].encode()
                    fields = {}
                    for part in body.split(b"--" + boundary)[1:-1]:
                        head, _, value = part.strip(b"\r\n").partition(b"\r\n\r\n")
                        name = head.split(b'name="')[1].split(b'"')[0].decode()
                        fields[name] = (head, value)
                    fname = fields["image"][0].split(b'filename="')[1].split(b'"')[0].decode()
                    sub = fields["subfolder"][1].decode()
                    outer.uploads[f"{sub}/{fname}"] = fields["image"][1]
                    return self._send(200, {"name": fname, "subfolder": sub, "type": "input"})
                if self.path == "/prompt":
                    payload = json.loads(body)
                    if outer.reject:
                        return self._send(400, outer.reject)
                    outer.prompts.append(payload)
                    return self._send(200, {"prompt_id": "p1", "number": 0, "node_errors": {}})
                self._send(404, {})

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                if url.path == "/history/p1":
                    if outer.fail:
                        status = {
                            "status_str": "error",
                            "completed": False,
                            "messages": [["execution_error", outer.fail]],
                        }
                        return self._send(200, {"p1": {"outputs": {}, "status": status}})
                    entry = {
                        "outputs": {
                            "5": {"images": [{"filename": "hairdiff_00001_.png", "subfolder": "", "type": "output"}]}
                        },
                        "status": {"status_str": "success", "completed": True, "messages": []},
                    }
                    return self._send(200, {"p1": entry})
                if url.path == "/view":
                    q = urllib.parse.parse_qs(url.query)
                    return self._send(200, ("IMG:" + q["filename"][0]).encode(), "image/png")
                self._send(404, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name in ("photo", "sketch", "matte"):
        p = tmp_path / f"{name}.png"
        p.write_bytes(name.encode() * 10)
        paths[name] = p
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(GRAPH))
    paths["workflow"] = wf
    return paths


def _argv(server, files, out, *extra):
    return [
        "comfy-run",
        "--server",
        server,
        "--workflow",
        str(files["workflow"]),
        "--image",
        str(files["photo"]),
        "--sketch",
        str(files["sketch"]),
        "--matte",
        str(files["matte"]),
        "--out",
        str(out),
        "--timeout",
        "20",
        *extra,
    ]


def test_run_uploads_patches_submits_and_downloads(files, tmp_path):
    fake = FakeComfy()
    try:
        rc = main(
            _argv(
                fake.url, files, tmp_path / "out", "--set", "HairDiff Sampler.steps=4", "--set", "5.filename_prefix=x"
            )
        )
    finally:
        fake.close()
    assert rc == 0
    assert fake.uploads == {f"hairdiff/{n}.png": n.encode() * 10 for n in ("photo", "sketch", "matte")}
    (payload,) = fake.prompts
    g = payload["prompt"]
    assert [g[i]["inputs"]["image"] for i in "123"] == [
        "hairdiff/photo.png",
        "hairdiff/sketch.png",
        "hairdiff/matte.png",
    ]
    assert g["4"]["inputs"]["steps"] == 4 and g["5"]["inputs"]["filename_prefix"] == "x"
    assert g["4"]["inputs"]["photo"] == ["1", 0]
    assert (tmp_path / "out" / "hairdiff_00001_.png").read_bytes() == b"IMG:hairdiff_00001_.png"


def test_validation_errors_become_readable_lines(files, tmp_path, capsys):
    reject = {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
        },
        "node_errors": {
            "4": {
                "class_type": "HairDiff_Sampler",
                "dependent_outputs": ["5"],
                "errors": [
                    {
                        "type": "value_smaller_than_min",
                        "message": "Value 0 smaller than min of 1",
                        "details": "steps",
                        "extra_info": {"input_name": "steps"},
                    }
                ],
            }
        },
    }
    fake = FakeComfy(reject=reject)
    try:
        rc = main(_argv(fake.url, files, tmp_path / "out"))
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert rc == 2
    assert "node 4 (HairDiff_Sampler 'HairDiff Sampler') input 'steps': Value 0 smaller than min of 1" in err


def test_a_custom_validation_message_is_shown_once_per_node():
    # ComfyUI repeats a node's validate_inputs answer for every input the method takes.
    message = "Load HairDiff Model: input 'base_model' is 'x.safetensors'; allowed: 'tiny (wiring check)'"
    errors = [
        {
            "type": "custom_validation_failed",
            "message": "Custom validation failed for node",
            "details": f"{name} - {message}",
            "extra_info": {"input_name": name},
        }
        for name in ("base_model", "adapter", "dtype")
    ]
    graph = {"5": {"class_type": "HairDiff_LoadModel", "inputs": {}, "_meta": {"title": "Load HairDiff Model"}}}
    text = C.format_validation_error(
        {"node_errors": {"5": {"class_type": "HairDiff_LoadModel", "errors": errors}}}, graph
    )
    assert text == f"node 5 (HairDiff_LoadModel 'Load HairDiff Model'): {message}"


def test_execution_error_is_reported(files, tmp_path, capsys):
    # ComfyUI names a custom node's exception by its module path; the user sees the class name.
    fail = {
        "node_id": "4",
        "node_type": "HairDiff_Sampler",
        "exception_type": "/srv/ComfyUI/custom_nodes/hairdiff.hairdiff_core.errors.InputError",
        "exception_message": "HairDiff Sampler: input 'matte': the hair matte is empty",
    }
    fake = FakeComfy(fail=fail)
    try:
        rc = main(_argv(fake.url, files, tmp_path / "out"))
    finally:
        fake.close()
    assert (
        rc == 2
        and "node 4 (HairDiff_Sampler) failed: InputError: HairDiff Sampler: input 'matte'" in capsys.readouterr().err
    )


def test_unreachable_server_and_bad_arguments_fail_before_uploading(files, tmp_path, capsys):
    assert main(_argv("http://127.0.0.1:9", files, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "cannot reach ComfyUI at http://127.0.0.1:9" in err
    assert "--port 9)" in err and "8188" not in err  # the hint names the server that was asked
    assert main(_argv("http://127.0.0.1:9", files, tmp_path / "out", "--set", "HairDiff Sampler.stepz=3")) == 2
    assert "has no input 'stepz'" in capsys.readouterr().err
    assert main(_argv("http://127.0.0.1:9", files, tmp_path / "out", "--set", "Nope.steps=3")) == 2
    assert "no node with id or title 'Nope'" in capsys.readouterr().err


def test_graph_helpers():
    assert C.parse_value("4") == 4 and C.parse_value("true") is True and C.parse_value("abc") == "abc"
    with pytest.raises(C.InputError, match="is a link"):
        C.apply_sets(GRAPH, ["4.photo=3"])
    with pytest.raises(C.InputError, match="pass --matte"):
        C.prepare_graph(GRAPH, {"photo": "a", "sketch": "b"}, [])
    no_matte = {k: v for k, v in GRAPH.items() if k != "3"}
    with pytest.raises(C.InputError, match="--matte was given.*no Load Image node titled 'Matte'"):
        C.prepare_graph(no_matte, {"photo": "a", "sketch": "b", "matte": "c"}, [])


def test_protect_is_an_optional_role_that_swaps_the_shipped_face_mask():
    from pathlib import Path

    graph = C.load_workflow(Path(__file__).resolve().parents[1] / "workflows" / "api" / "hairdiff_shorter_hair.json")
    roles = C.role_nodes(graph)
    assert graph[roles["protect"]]["inputs"]["image"] == "hairdiff_face_protect.png"
    files = {"photo": "p.png", "sketch": "s.png", "matte": "m.png"}
    kept = C.prepare_graph(graph, files, [])  # not required: the shipped mask stays, with a warning
    assert kept[roles["protect"]]["inputs"]["image"] == "hairdiff_face_protect.png"
    line = C.kept_protect_warning(graph, files)
    assert "(hairdiff_face_protect.png: the sample photo's face, transparent)" in line and "--protect FILE" in line
    assert C.kept_protect_warning(graph, {**files, "protect": "f.png"}) is None
    assert C.kept_protect_warning(GRAPH, files) is None  # no Protect node
    swapped = C.prepare_graph(graph, {**files, "protect": "face.png"}, [])
    assert swapped[roles["protect"]]["inputs"]["image"] == "face.png"
    with pytest.raises(C.InputError, match="--protect was given.*no Load Image node titled 'Protect'"):
        C.prepare_graph(GRAPH, {"photo": "a", "sketch": "b", "matte": "c", "protect": "d"}, [])


def test_run_protect_uploads_a_transparent_picture_as_is_and_converts_a_plain_mask(files, tmp_path, caplog):
    """--protect takes what Load Image reads into the templates' exclude (MASK = 1 - alpha): a picture with
    the protected part transparent goes up unchanged; a plain mask (white = keep) is sent as an RGBA PNG
    with the white part transparent, so both give ComfyUI the same MASK."""
    import io

    import numpy as np
    from PIL import Image

    graph = {**GRAPH, "6": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Protect"}}}
    files["workflow"].write_text(json.dumps(graph))
    keep = np.zeros((20, 16), dtype=bool)
    keep[5:12, 4:10] = True
    plain = tmp_path / "face_mask.png"
    Image.fromarray(np.where(keep, 255, 0).astype(np.uint8)).save(plain)
    rgba = Image.new("RGB", (16, 20), (10, 120, 200))
    rgba.putalpha(Image.fromarray(np.where(keep, 0, 255).astype(np.uint8)))
    painted = tmp_path / "painted.png"
    rgba.save(painted)
    for given, uploaded_as in ((painted, "painted.png"), (plain, "face_mask_protect.png")):
        fake = FakeComfy()
        try:
            assert main(_argv(fake.url, files, tmp_path / "out", "--protect", str(given))) == 0
        finally:
            fake.close()
        assert fake.prompts[0]["prompt"]["6"]["inputs"]["image"] == f"hairdiff/{uploaded_as}"
        data = fake.uploads[f"hairdiff/{uploaded_as}"]
        if given == painted:
            assert data == painted.read_bytes()
        with Image.open(io.BytesIO(data)) as im:  # ComfyUI's Load Image: MASK = 1 - alpha
            assert im.mode == "RGBA" and np.array_equal(255 - np.asarray(im.getchannel("A")) > 127, keep)
    # A picture that protects nothing says so (and still runs).
    empty = tmp_path / "black.png"
    Image.new("L", (16, 20), 0).save(empty)
    fake = FakeComfy()
    try:
        assert main(_argv(fake.url, files, tmp_path / "out", "--protect", str(empty))) == 0
    finally:
        fake.close()
    assert "protects nothing" in caplog.text


def test_ui_format_workflow_is_refused_with_a_hint(tmp_path):
    p = tmp_path / "ui.json"
    p.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(C.InputError, match="UI format.*API format"):
        C.load_workflow(p)
