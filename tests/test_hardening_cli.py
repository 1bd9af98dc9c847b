"""The bad-input contract of the CLI, table-driven: one line on stderr, exit 2, no traceback,
nothing written, no input touched, and no model loaded (each check runs before it).

Each row is a sample of a class (a size parameter out of range, a non-finite number, an
unwritable output, a missing file...); the same checks serve the Python API (see
test_hardening_api.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import hairdiff_cli

ASSETS = Path(__file__).resolve().parent.parent / "hairdiff_core" / "assets"


@pytest.fixture
def inputs(tmp_path):
    """The bundled samples copied to a scratch folder, and an empty output folder."""
    src = tmp_path / "in"
    src.mkdir()
    for k in ("photo", "sketch", "matte"):
        shutil.copy(ASSETS / f"sample_{k}.png", src / f"{k}.png")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "a_file").write_text("x")
    return tmp_path


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    """Every refusal must come before a model loads: loading fails the test."""
    import hairdiff_core.models.loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(hairdiff_core.models.loading, "load_models", refuse)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        rc = hairdiff_cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def _check_refused(argv, pattern, capsys, root: Path):
    before = _digest(root / "in")
    rc, lines = _run(argv, capsys)
    assert rc == 2, (argv, lines)
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and lines[0].startswith("hairdiff"), lines
    import re

    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert _digest(root / "in") == before  # inputs untouched
    assert list((root / "out").iterdir()) == []  # nothing written, no temp file left
    assert not (root / "new_out").exists()
    return lines[0]


BIG = str(2**64)
GENERATE_CASES = [
    (["--feather", "1e9"], r"feather must be a number from 0 to 1024.*got 1000000000"),
    (["--feather", "nan"], r"feather .*got nan"),
    (["--feather", "-5"], r"feather .*got -5"),
    (["--seed", BIG], r"seed must be a whole number from 0 to 18446744073709551615, got 18446744073709551616"),
    (["--seed", "-1"], r"seed .*got -1"),
    (["--steps", "100000000000"], r"steps must be a whole number from 1 to 1000"),
    (["--steps", "0"], r"steps .*got 0"),
    (["--strength", "1.5"], r"strength must be a number from 0 to 1"),
    (["--cfg", "-3"], r"cfg .*got -3"),
    (["--cfg", "inf"], r"cfg .*got inf"),
    (["--shift", "-2"], r"shift must be a number above 0"),
    (["--shift", "0"], r"shift .*got 0"),
    (["--shift", "nan"], r"shift .*got nan"),
    (["--shift", "1e-300"], r"shift must be a number above 0.01 up to 100, got 1e-300"),
    (
        ["--reference", "once", "--ref-weight-outside", "1e308"],
        r"--ref-weight-outside: weight_outside must be from 0 to 100",
    ),
    (["--reference", "once", "--ref-weight-inside", "101"], r"weight_inside must be from 0 to 100.*got 101"),
    (["--max-megapixels", "1e9"], r"--max-megapixels must be a number above 0 up to 2000"),
    (["--margin", "-5", "--work-size", "64"], r"margin .*got -5"),
    (["--margin", "1e12"], r"margin .*got 1000000000000"),
    (["--work-size", "-64"], r"work size .*got -64"),
    (["--work-size", "7"], r"work size .*got 7"),
    (["--work-size", "100"], r"work size must be a multiple of 16, got 100; e.g. 96"),
    (["--work-size", "1000000"], r"work size .*to 4096"),
    (["--matte-threshold", "-1"], r"matte threshold .*got -1"),
    (["--ref-weight-inside", "2"], r"--ref-weight-inside given but --reference is off"),
    (["--reference", "once", "--ref-weight-inside", "nan"], r"weight_inside must be finite"),
    (["--method", "replace", "--reference", "once"], r"--reference is part of the joint method"),
    (["--style-weight", "101"], r"style weight must be a number from 0 to 100.*got 101"),
    (["--style-weight", "0.5"], r"--style-weight given but no --style-image"),
    (["--device", "banana"], r"unknown device 'banana'"),
    (["--dtype", "fp8"], r"invalid choice: 'fp8'"),
    (["--adapter", "missing.safetensors"], r"adapter not found: missing.safetensors"),
    (
        ["--tiny", "--model", "x"],
        r"pass one of --model PATH, --toy or --tiny \(built-in models\), not --model PATH and --tiny",
    ),
]


@pytest.mark.parametrize("extra,pattern", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_generate_refuses_bad_settings(inputs, capsys, extra, pattern):
    i = inputs / "in"
    argv = [
        "generate",
        "--image",
        str(i / "photo.png"),
        "--sketch",
        str(i / "sketch.png"),
        "--matte",
        str(i / "matte.png"),
        "--out",
        str(inputs / "out" / "r.png"),
    ]
    if "--model" not in extra:
        argv.append("--tiny")
    _check_refused(argv + extra, pattern, capsys, inputs)


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A PNG whose header claims side x side pixels (PIL refuses it when opening)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


OUT_CASES = [
    ("out/r.jpx", r"unknown image suffix '.jpx'"),
    ("out", r"is an existing folder"),
    ("", r"output path is empty"),
    ("in/photo.png", r"is also an input"),
    ("a_file/r.png", r"a_file is a file, not a folder"),
]


@pytest.mark.parametrize("out,pattern", OUT_CASES, ids=[c[0] or "empty" for c in OUT_CASES])
def test_generate_refuses_bad_outputs(inputs, capsys, out, pattern):
    i = inputs / "in"
    argv = [
        "generate",
        "--image",
        str(i / "photo.png"),
        "--sketch",
        str(i / "sketch.png"),
        "--matte",
        str(i / "matte.png"),
        "--out",
        str(inputs / out) if out else "",
        "--tiny",
    ]
    _check_refused(argv, pattern, capsys, inputs)


@pytest.mark.parametrize("kind", ["bomb", "not_an_image", "missing", "folder"])
def test_generate_refuses_bad_image_files(inputs, capsys, kind):
    i = inputs / "in"
    bad = inputs / "bad.png"
    pattern = {
        "bomb": r"is 20000x20000 px = 400.0 MP, more than the limit of 120 MP \(--max-megapixels",
        "not_an_image": r"cannot read image",
        "missing": r"file not found: .*bad.png",
        "folder": r"is a folder",
    }[kind]
    if kind == "bomb":
        _bomb_png(bad)
    elif kind == "not_an_image":
        bad.write_text("hello")
    elif kind == "folder":
        bad.mkdir()
    argv = [
        "generate",
        "--image",
        str(bad),
        "--sketch",
        str(i / "sketch.png"),
        "--matte",
        str(i / "matte.png"),
        "--out",
        str(inputs / "out" / "r.png"),
        "--tiny",
    ]
    _check_refused(argv, pattern, capsys, inputs)


EVAL_CASES = [
    (["--out", "{root}/a_file"], r"is an existing file, not a folder"),
    (["--steps", "0"], r"steps .*got 0"),
    (["--feather", "nan"], r"feather .*got nan"),
    (["--ref-weight-inside", "1"], r"--reference is off"),
    (["--limit", "0"], r"--limit must be"),
    (["--edge-threshold", "nan"], r"--edge-threshold"),
    (["--device", "banana"], r"unknown device"),
    (["--data", "{root}/nope"], r"--data .*not a folder"),
]


@pytest.mark.parametrize("extra,pattern", EVAL_CASES, ids=[" ".join(c[0]) for c in EVAL_CASES])
def test_eval_refuses_bad_settings(inputs, capsys, extra, pattern):
    from training.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(inputs / "ds", n=1, size=32, braid=0)
    args = {"--data": str(data), "--out": str(inputs / "new_out")}
    rest = []
    for k, v in zip(extra[::2], extra[1::2]):
        if k in args:
            args[k] = v.format(root=inputs)
        else:
            rest += [k, v]
    argv = ["eval", "--tiny"] + [x for kv in args.items() for x in kv] + rest
    _check_refused(argv, pattern, capsys, inputs)


DEMO_CASES = [
    (["--out", "{root}/a_file"], r"is an existing file, not a folder"),
    (["--steps", "0"], r"steps .*got 0"),
    (["--seed", BIG], r"seed .*got 18446744073709551616"),
]


@pytest.mark.parametrize("extra,pattern", DEMO_CASES, ids=[" ".join(c[0]) for c in DEMO_CASES])
def test_demo_refuses_bad_settings(inputs, capsys, extra, pattern):
    argv = ["demo"] + [x.format(root=inputs) for x in extra]
    if "--out" not in extra:
        argv += ["--out", str(inputs / "new_out")]
    _check_refused(argv, pattern, capsys, inputs)


TRAIN_CASES = [
    (["--output", "{root}/a_file"], r"is an existing file, not a folder"),
    (["--lr", "nan"], r"--lr must be .*got nan"),
    (["--lr", "-1"], r"--lr must be a number above 0"),
    (["--rank", "0"], r"--rank must be .*got 0"),
    (["--max-steps", "0"], r"--max-steps .*got 0"),
    (["--seed", BIG], r"--seed must be .*2147483647"),
    (["--feather-sigma", "inf"], r"--feather-sigma .*got inf"),
    (["--data", "{root}/nope"], r"dataset folder not found|not a folder|file not found"),
    (["--config", "{root}/bad.json"], r"--rank must be a whole number .*'sixteen'"),
    (["--config", "{root}/bad_bool.json"], r"--tiny is a switch: true or false, got 'yes'"),
    (["--data", "{root}/bad_ds"], r"sketch|matte|missing"),
]


@pytest.mark.parametrize("extra,pattern", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_refuses_bad_settings(inputs, capsys, extra, pattern):
    from training.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(inputs / "ds", n=2, size=32, braid=0)
    bad = make_synthetic_dataset(inputs / "bad_ds", n=2, size=32, braid=0)
    next((bad / "matte").iterdir()).unlink()  # a sample without its matte: the dataset is refused
    (inputs / "bad.json").write_text(json.dumps({"rank": "sixteen"}))
    (inputs / "bad_bool.json").write_text(json.dumps({"tiny": "yes"}))
    args = {"--data": str(data), "--output": str(inputs / "new_out")}
    rest = []
    for k, v in zip(extra[::2], extra[1::2]):
        if k in args:
            args[k] = v.format(root=inputs)
        else:
            rest += [k, v.format(root=inputs)]
    tiny = [] if "bad_bool" in " ".join(extra) else ["--tiny"]
    argv = (
        ["train", *tiny, "--mixed-precision", "no", "--max-steps", "1"] + [x for kv in args.items() for x in kv] + rest
    )
    _check_refused(argv, pattern, capsys, inputs)


def _numeric_options(command: str) -> list[str]:
    """Every int/float option of a subcommand, read from the parser itself (new flags included)."""
    import argparse

    parser = hairdiff_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [a.option_strings[-1] for a in sub._actions if a.type in (int, float) and a.option_strings]


def _base_argv(command: str, root: Path) -> list[str]:
    i = root / "in"
    if command == "generate":
        return [
            "generate",
            "--tiny",
            "--image",
            str(i / "photo.png"),
            "--sketch",
            str(i / "sketch.png"),
            "--matte",
            str(i / "matte.png"),
            "--out",
            str(root / "out" / "r.png"),
            "--reference",
            "once",
        ]
    if command == "eval":
        from training.synthetic import make_synthetic_dataset

        data = make_synthetic_dataset(root / "ds", n=1, size=32, braid=0)
        return ["eval", "--tiny", "--data", str(data), "--out", str(root / "new_out"), "--reference", "once"]
    if command == "train":
        from training.synthetic import make_synthetic_dataset

        data = make_synthetic_dataset(root / "ds", n=1, size=32, braid=0)
        return ["train", "--tiny", "--data", str(data), "--output", str(root / "new_out"), "--mixed-precision", "no"]
    return ["demo", "--out", str(root / "new_out")]


@pytest.mark.parametrize("command", ["generate", "eval", "train", "demo"])
def test_every_numeric_option_refuses_nan_and_absurd_values(inputs, capsys, command):
    """The class, not the samples: each int/float flag, including ones added later, must refuse a
    non-finite or hugely negative value with one line before anything loads."""
    base = _base_argv(command, inputs)
    options = _numeric_options(command)
    assert options
    for option in options:
        for value in ("nan", "-99999999999"):
            names = "|".join(re.escape(n) for n in (option, option[2:].replace("-", " "), "invalid"))
            _check_refused(base + [option, value], names, capsys, inputs)


@pytest.fixture
def no_hang():
    """Opening a FIFO blocks until a writer comes: fail after 30 s instead of hanging the suite."""
    import signal

    def hung(*_):
        raise TimeoutError("blocked on a special file")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


FIFO_CASES = [
    ("generate", "--image"),
    ("generate", "--sketch"),
    ("generate", "--matte"),
    ("generate", "--exclude"),
    ("generate", "--prompt-embeds"),
    ("generate", "--adapter"),
    ("generate", "--style-image"),
    ("generate", "--style-matte"),
    ("train", "--data"),
    ("train", "--config"),
    ("prepare", "--images"),
    ("prepare", "--mattes"),
]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("command,flag", FIFO_CASES, ids=[" ".join(c) for c in FIFO_CASES])
def test_special_files_are_refused_before_they_are_opened(inputs, capsys, no_hang, command, flag):
    fifo = inputs / "pipe.png"
    os.mkfifo(fifo)
    i = inputs / "in"
    if command == "generate":
        argv = ["generate", "--tiny", "--image", str(i / "photo.png"), "--sketch", str(i / "sketch.png")]
        argv += ["--matte", str(i / "matte.png"), "--out", str(inputs / "out" / "r.png")]
        if flag in ("--image", "--sketch"):
            argv[argv.index(flag) + 1] = str(fifo)
        elif flag.startswith("--style"):
            other = {"--style-image": "--style-matte", "--style-matte": "--style-image"}[flag]
            argv += [flag, str(fifo), other, str(i / ("matte.png" if other == "--style-matte" else "photo.png"))]
        else:
            argv += [flag, str(fifo)]
    elif command == "train":
        from training.synthetic import make_synthetic_dataset

        data = make_synthetic_dataset(inputs / "ds", n=1, size=32, braid=0)
        argv = ["train", "--tiny", "--data", str(data), "--output", str(inputs / "new_out"), "--max-steps", "1"]
        if flag == "--data":
            argv[argv.index(flag) + 1] = str(fifo)
        else:
            argv += [flag, str(fifo)]
    else:
        argv = ["prepare", "--images", str(i), "--mattes", str(i), "--out", str(inputs / "new_out")]
        argv[argv.index(flag) + 1] = str(fifo)
    _check_refused(argv, r"pipe\.png is a named pipe \(FIFO\), not a regular file", capsys, inputs)


def test_long_output_names_fit_or_are_refused_before_any_work(inputs, capsys, monkeypatch):
    """A name at the filesystem's limit is written (its temporary name is shortened to fit); one
    byte more, in ASCII or in 2-byte letters, is refused before the model loads."""
    from hairdiff_core.fileio import atomic_write_text, name_max

    limit = name_max(inputs / "out")
    i = inputs / "in"
    base = ["generate", "--tiny", "--image", str(i / "photo.png"), "--sketch", str(i / "sketch.png")]
    base += ["--matte", str(i / "matte.png"), "--steps", "1", "--out"]
    for name in ("r" * (limit - 3) + ".png", "é" * ((limit - 3) // 2) + ".png", "x" * (limit + 50) + ".png"):
        if len(os.fsencode(name)) <= limit:
            continue
        _check_refused(base + [str(inputs / "out" / name)], r"bytes long, more than the \d+ bytes", capsys, inputs)
    _check_refused(base + [str(inputs / "out" / ("d" * (limit + 1)) / "r.png")], r"bytes long", capsys, inputs)

    monkeypatch.undo()  # this one loads the tiny model
    fits = inputs / "out" / ("r" * (limit - 4) + ".png")
    rc, lines = _run(base + [str(fits)], capsys)
    assert rc == 0, lines
    assert [p.name for p in (inputs / "out").iterdir()] == [fits.name]
    atomic_write_text(inputs / "out" / ("t" * limit), "ok")  # the Python API's writer too
    assert sorted(p.name for p in (inputs / "out").iterdir()) == sorted([fits.name, "t" * limit])


@pytest.mark.parametrize(
    "side,extra,pattern",
    [
        (12000, [], r"12000x12000 px = 144.0 MP, more than the limit of 120 MP"),  # PIL only warns at 144 MP
        (9500, [], r"90.2 MP, more than the limit of 120 MP|cannot read image"),  # below the limit: decoded
        (600, ["--max-megapixels", "0.1"], r"600x600 px = 0.4 MP, more than the limit of 0.1 MP"),
        (600, ["--max-megapixels", "0"], r"--max-megapixels must be a number above 0"),
        (600, ["--max-megapixels", "nan"], r"--max-megapixels .*got nan"),
    ],
    ids=["144MP", "90MP", "lowered", "zero", "nan"],
)
def test_huge_photos_are_refused_from_the_header(inputs, capsys, side, extra, pattern):
    import warnings

    i = inputs / "in"
    bad = inputs / "huge.png"
    _bomb_png(bad, side)
    argv = ["generate", "--tiny", "--image", str(bad), "--sketch", str(i / "sketch.png")]
    argv += ["--matte", str(i / "matte.png"), "--out", str(inputs / "out" / "r.png"), *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's own bomb warning must not be what the user sees
        if side == 9500:
            # 90 MP is within the limit: it is decoded (and this fake one is truncated), no PIL warning.
            rc, lines = _run(argv, capsys)
            assert rc == 2 and len(lines) == 1 and "cannot read image" in lines[0], lines
            return
        _check_refused(argv, pattern, capsys, inputs)


@pytest.mark.parametrize(
    "extra,pattern",
    [
        (["--tiny", "--out", "{root}/out/x.png"], r"--out x.png: prompt embeddings are a .safetensors file"),
        (["--model", "{root}/nope", "--out", "{root}/out/x.safetensors"], r"model not found: .*nope"),
    ],
    ids=["png-name", "missing-model"],
)
def test_encode_prompt_refuses_misleading_outputs_and_models(inputs, capsys, extra, pattern):
    argv = ["encode-prompt", "--prompt", "red hair"] + [x.format(root=inputs) for x in extra]
    _check_refused(argv, pattern, capsys, inputs)


@pytest.mark.parametrize("flag", ["--matte", "--sketch", "--exclude"])
def test_a_wrongly_shaped_sketch_or_matte_is_named_by_its_file(inputs, capsys, flag):
    """Not "the mask 1": the flag, the file and the photo's size, read from the headers."""
    from PIL import Image

    i = inputs / "in"
    wide = inputs / "wide.png"
    Image.new("L", (100, 50), 255).save(wide)
    argv = ["generate", "--tiny", "--image", str(i / "photo.png"), "--sketch", str(i / "sketch.png")]
    argv += ["--matte", str(i / "matte.png"), "--out", str(inputs / "out" / "r.png")]
    if flag == "--exclude":
        argv += [flag, str(wide)]
    else:
        argv[argv.index(flag) + 1] = str(wide)
    noun = {"--exclude": "exclusion mask"}.get(flag, flag[2:])
    pattern = rf"the {noun} .*wide\.png \({flag}\) is 100x50 but the photo .*photo\.png is 300x372: .*canvas of 300x372"
    _check_refused(argv, pattern, capsys, inputs)


ADAPTER_HEADER_CASES = [
    (("in_channels",), "32", r"'in_channels' is a string \('32'\), expected an integer"),
    (("lora", "rank"), "16", r"'lora.rank' is a string \('16'\), expected an integer"),
    (("lora", "alpha"), None, r"'lora.alpha' is null, expected a number"),
    (("lora", "targets"), "to_q", r"'lora.targets' is a string \('to_q'\), expected a list of strings"),
    (("base", "dims", "num_layers"), 4.5, r"'base.dims.num_layers' is a number \(4.5\), expected an integer"),
    (("base", "dims"), [], r"'base.dims' is a list \(\[\]\), expected an object"),
    (("format_version",), "1", r"'format_version' is a string \('1'\), expected an integer"),
]


@pytest.mark.parametrize(
    "where,value,pattern", ADAPTER_HEADER_CASES, ids=[".".join(c[0]) for c in ADAPTER_HEADER_CASES]
)
def test_a_wrongly_typed_adapter_field_is_named_with_its_type(inputs, capsys, where, value, pattern):
    """A field of the wrong type is not "missing": the message names it, its type and the one expected."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hairdiff_core.models.toy import adapter_path

    with safe_open(str(adapter_path()), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["hairdiff"])
    node = meta
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    bad = inputs / "typed.safetensors"
    save_file(tensors, str(bad), metadata={**header, "hairdiff": json.dumps(meta)})
    i = inputs / "in"
    argv = ["generate", "--toy", "--adapter", str(bad), "--image", str(i / "photo.png"), "--sketch"]
    argv += [str(i / "sketch.png"), "--matte", str(i / "matte.png"), "--out", str(inputs / "out" / "r.png")]
    _check_refused(argv, rf"typed\.safetensors: header field {pattern}; .*re-export", capsys, inputs)


SERVER_CASES = [
    ("http://127.0.0.1:99999", r"the port must be 1 to 65535, got 99999"),
    ("127.0.0.1:0", r"the port must be 1 to 65535, got 0"),
    ("localhost:abc", r"the port 'abc' is not a number"),
    ("http://127.0.0.1 :8188", r"contains a space"),
    ("ftp://127.0.0.1:8188", r"http:// or https://, not ftp://"),
    ("http://", r"has no host name"),
    ("http://[::1", r"is not a valid address \(Invalid IPv6 URL\)"),
    ("", r"--server is empty"),
]


@pytest.mark.parametrize("server,pattern", SERVER_CASES, ids=[c[0] or "empty" for c in SERVER_CASES])
def test_comfy_run_refuses_a_bad_server_address_before_any_work(inputs, capsys, monkeypatch, server, pattern):
    """The address itself is the mistake: no traceback, no "start ComfyUI" advice, no connection tried."""
    import socket
    import urllib.request

    from hairdiff_cli import comfy_client

    def no_network(*a, **k):
        raise AssertionError("a connection was tried with a bad --server")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(comfy_client, "load_workflow", lambda *a: pytest.fail("the workflow was read first"))
    i = inputs / "in"
    argv = ["comfy-run", "--server", server, "--workflow", str(inputs / "a_file"), "--image", str(i / "photo.png")]
    argv += ["--sketch", str(i / "sketch.png"), "--matte", str(i / "matte.png"), "--out", str(inputs / "new_out")]
    line = _check_refused(argv, pattern, capsys, inputs)
    assert "--server" in line and "start it" not in line


@pytest.mark.parametrize("value", ["nan", "-1", "0", "1e12"])
def test_comfy_run_refuses_a_bad_timeout_before_any_work(inputs, capsys, value):
    argv = ["comfy-run", "--timeout", value, "--workflow", str(inputs / "a_file"), "--out", str(inputs / "new_out")]
    _check_refused(argv, r"--timeout must be a number above 0 up to 604800, got ", capsys, inputs)


def test_a_refused_connection_keeps_the_start_comfyui_advice():
    import socket

    from hairdiff_cli.comfy_client import ComfyClient, ComfyServerError

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ComfyServerError, match=rf"cannot reach ComfyUI .*start it there .*--port {port}"):
        ComfyClient(f"127.0.0.1:{port}", timeout=5).history("x")


@pytest.mark.parametrize("given", [[], ["--image"], ["--image", "--sketch"]])
def test_comfy_run_names_the_real_flags_of_missing_images(inputs, capsys, given):
    """The photo's flag is --image (as in generate), not --photo."""
    import argparse

    from hairdiff_cli import comfy_client

    parser = argparse.ArgumentParser()
    comfy_client.add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    i = inputs / "in"
    files = {"--image": i / "photo.png", "--sketch": i / "sketch.png"}
    workflow = Path(__file__).resolve().parent.parent / "workflows" / "api" / "hairdiff_basic.json"
    argv = ["comfy-run", "--workflow", str(workflow), "--out", str(inputs / "new_out")]
    for flag in given:
        argv += [flag, str(files[flag])]
    rc, lines = _run(argv, capsys)
    assert rc == 2 and len(lines) == 1, lines
    named = re.findall(r"(--[a-z]+) FILE", lines[0])
    assert named and set(named) <= flags and "--photo" not in lines[0], lines[0]
    assert set(named) == {"--image", "--sketch", "--matte"} - set(given)
    assert not (inputs / "new_out").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("out", ["/proc/hairdiff_x", "/proc/hairdiff_x/deeper", "/proc"])
@pytest.mark.parametrize("command", ["demo", "generate"])
def test_an_output_folder_that_takes_no_files_is_refused_before_any_work(inputs, capsys, monkeypatch, out, command):
    """/proc answers os.access "writable" (for root always), yet creates nothing: the output is
    tried (an empty folder made and removed) before the demo runs, not after."""
    from hairdiff_cli.commands import demo

    monkeypatch.setattr(demo, "run_toy", lambda args: pytest.fail("the demo ran before its output was checked"))
    i = inputs / "in"
    if command == "demo":
        argv = ["demo", "--out", out]
    else:
        argv = ["generate", "--tiny", "--image", str(i / "photo.png"), "--sketch", str(i / "sketch.png")]
        argv += ["--matte", str(i / "matte.png"), "--out", out + "/r.png"]
    # Non-root users get os.access's answer first; root gets the probe's.
    pattern = r"output .*/proc.*(/proc does not take new files .*choose another folder|is not writable)"
    _check_refused(argv, pattern, capsys, inputs)
    assert not Path("/proc/hairdiff_x").exists()


def test_the_output_probe_leaves_nothing_behind(tmp_path):
    from hairdiff_core.fileio import check_writable_file, check_writable_folder

    check_writable_folder(tmp_path, "output")
    check_writable_folder(tmp_path / "new" / "deeper", "output")
    check_writable_file(tmp_path / "new" / "r.png", "output")
    assert list(tmp_path.iterdir()) == []


STYLE_CASES = [
    ("missing matte", ["--style-image", "{i}/photo.png"], r"--style-image .*photo\.png given without --style-matte"),
    ("missing image", ["--style-matte", "{i}/matte.png"], r"--style-matte .*matte\.png given without --style-image"),
    (
        "other aspect",
        ["--style-image", "{i}/photo.png", "--style-matte", "{root}/wide.png"],
        r"the style matte .*wide\.png \(--style-matte\) is 100x50 but the style image .*photo\.png is 300x372",
    ),
    (
        "empty matte",
        ["--style-image", "{root}/style.png", "--style-matte", "{root}/empty.png"],
        r"--style-matte .*empty\.png: the style matte is empty",
    ),
    ("missing file", ["--style-image", "{root}/nope.png", "--style-matte", "{i}/matte.png"], r"nope\.png"),
    (
        "replace method",
        ["--style-image", "{i}/photo.png", "--style-matte", "{i}/matte.png", "--method", "replace"],
        r"--style-image is part of the joint method",
    ),
]


@pytest.mark.parametrize("extra,pattern", [c[1:] for c in STYLE_CASES], ids=[c[0] for c in STYLE_CASES])
def test_generate_refuses_bad_style_inputs(inputs, capsys, extra, pattern):
    """A style photo without its matte (or the reverse), a style matte of another aspect than its
    photo, an empty style matte: one line, exit 2, before the model loads."""
    from PIL import Image

    i = inputs / "in"
    Image.new("L", (100, 50), 255).save(inputs / "wide.png")
    Image.new("RGB", (40, 60), (90, 60, 30)).save(inputs / "style.png")  # any size, its own aspect
    Image.new("L", (20, 30), 0).save(inputs / "empty.png")
    argv = ["generate", "--tiny", "--image", str(i / "photo.png"), "--sketch", str(i / "sketch.png")]
    argv += ["--matte", str(i / "matte.png"), "--out", str(inputs / "out" / "r.png")]
    argv += [a.format(i=i, root=inputs) for a in extra]
    _check_refused(argv, pattern, capsys, inputs)
