"""Shards from URLs through webdataset: HTTP from a local server, ``pipe:`` commands, a truncated shard
over HTTP (skipped and counted, the run goes on), exact resume over HTTP, and ``mdm tokenizer
encode/eval`` on URL shards."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mdm.data.shard_reader import (
    TruncatedShard,
    UnreadableShard,
    expand_shards,
    iter_tar_samples,
    shard_name,
)
from mdm.data.shards import write_shards
from mdm.data.streams import PretrainDataConfig, SourceConfig, StreamConfig
from tests.test_data_streams import CharTokenizer, _cfg, _pairs, _run, _same, _stream, _texts

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// with curl")


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder; under ``/drop/`` it announces the whole file but closes after half of it."""

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        if not self.path.startswith("/drop/"):
            return super().do_GET()
        data = Path(self.translate_path(self.path.replace("/drop/", "/", 1))).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(root, base URL)``: a folder with text, image and pair shards served on 127.0.0.1:<free port>."""
    root = tmp_path_factory.mktemp("served")
    world = {
        "text": _texts(root, "t", 64, 8),
        "pair": str(root / "pairs"),
        "image": str(root / "images"),
    }
    write_shards(_pairs(40, "p"), root / "pairs", "pair", max_count=10)
    images = ({"__key__": s["__key__"], "jpg": s["jpg"]} for s in _pairs(30, "i"))
    write_shards(images, root / "images", "image", max_count=10)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", world
    server.shutdown()
    server.server_close()


def _samples(url, start=0):
    return list(iter_tar_samples(url, start))


def test_http_and_pipe_give_the_local_samples_from_any_offset(served):
    root, base, _ = served
    local = _samples(root / "t" / "shard-000003.tar")
    assert [o for o, _ in local] == list(range(8)) and local[0][1]["txt"] == b"t line 24"
    for url in (
        f"{base}/t/shard-000003.tar",
        f"pipe:cat {root}/t/shard-000003.tar",
        f"file://{root}/t/shard-000003.tar",
    ):
        assert _samples(url) == local, url
        assert _samples(url, start=5) == local[5:], url


def test_url_specs_expand_braces_but_never_glob(served):
    root, base, _ = served
    urls = expand_shards([f"{base}/t/shard-{{000000..000007}}.tar"], "x")
    assert urls == [f"{base}/t/shard-{i:06d}.tar" for i in range(8)]
    cmds = expand_shards([f"pipe:cat {root}/t/shard-{{000000..000001}}.tar"], "x")
    assert cmds == [f"pipe:cat {root}/t/shard-00000{i}.tar" for i in range(2)]
    assert expand_shards([f"{base}/t/shard-00000?.tar"], "x") == [f"{base}/t/shard-00000?.tar"]
    assert expand_shards([f"file://{root}/t"], "x") == expand_shards([str(root / "t")], "x")
    with pytest.raises(ValueError, match=r"data.text.sources\[0\].*pipe:aws s3 cp s3://b/a.tar -"):
        expand_shards(["s3://b/a.tar"], "data.text.sources[0]")
    assert shard_name("pipe:aws s3 cp s3://b/shard-000007.tar -") == "shard-000007.tar"
    assert shard_name(f"{base}/t/shard-000001.tar?sig=x") == "shard-000001.tar"


def test_failures_over_http_and_pipe_are_named_and_classified(served):
    root, base, _ = served
    (root / "cut").mkdir(exist_ok=True)
    data = (root / "t" / "shard-000000.tar").read_bytes()
    (root / "cut" / "half.tar").write_bytes(data[: len(data) // 2])
    seen = []
    for url in (f"{base}/cut/half.tar", f"{base}/drop/t/shard-000000.tar"):  # short file, dropped link
        with pytest.raises(TruncatedShard, match="truncated") as e:
            for offset, _ in iter_tar_samples(url):
                seen.append(offset)
        assert url in str(e.value)
    assert 0 < len(seen) < 16
    with pytest.raises(UnreadableShard, match="exited with status 22"):  # curl -f: HTTP 404
        _samples(f"{base}/t/missing.tar")
    with pytest.raises(UnreadableShard, match="missing.tar"):
        _samples(f"pipe:cat {root}/missing.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_over_http_matches_local_and_resumes_exactly(served, workers):
    root, base, world = served
    local = _cfg(world, workers, min_mask_patches=2)
    remote = {k: f"{base}/{Path(p).name}/shard-{{{0:06d}..{n - 1:06d}}}.tar" for k, p, n in
              (("text", world["text"], 8), ("pair", world["pair"], 4), ("image", world["image"], 3))}  # fmt: skip
    over_http = _cfg(remote, workers, min_mask_patches=2)
    reference = _run(_stream(local), 6)
    assert all(_same(a, b) for a, b in zip(reference, _run(_stream(over_http), 6)))
    first = _stream(over_http)
    _run(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    offsets = [c[1] for pos in state["pair"]["positions"].values() for c in pos["cursors"]]
    assert any(0 < off < 10 for off in offsets)  # resumes in the middle of a shard
    resumed = _stream(over_http)
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(reference[3:], _run(resumed, 3)))


def test_stream_skips_and_counts_a_truncated_and_a_missing_shard_over_http(served):
    root, base, _ = served
    # one good and one truncated shard, both over HTTP: the broken one is skipped and counted
    (root / "mixed").mkdir(exist_ok=True)
    shutil.copy(root / "t" / "shard-000001.tar", root / "mixed" / "a.tar")
    data = (root / "t" / "shard-000002.tar").read_bytes()
    (root / "mixed" / "b.tar").write_bytes(data[: len(data) // 2])
    spec = [f"{base}/mixed/{{a,b}}.tar", f"{base}/mixed/gone.tar"]
    cfg = PretrainDataConfig(
        text=StreamConfig(sources=[SourceConfig(spec)], batch_size=8, max_text_len=16), num_workers=0
    )
    stream = _stream(cfg)
    texts = [CharTokenizer().decode(r) for _ in range(3) for r in next(stream)["text"]["text"]]
    assert set(texts) <= {f"t line {i}" for i in range(8, 24)} and "t line 8" in texts
    skipped = stream.skipped
    assert skipped["text_truncated_tar"] >= 1 and skipped["text_unreadable_tar"] >= 1


def test_tokenizer_encode_and_eval_read_url_shards(served, tmp_path, capsys):
    from mdm.tokenizers import VQKD, load, save_tokenizer
    from mdm.tokenizers.cli import main
    from mdm.tokenizers.config import ViTConfig, VQKDConfig

    root, base, _ = served
    vit = ViTConfig(embed_dim=16, depth=1, num_heads=2)
    cfg = VQKDConfig(img_size=32, patch_size=8, encoder=vit, decoder=vit, codebook_size=16, code_dim=4)
    cfg.teacher_dim = 8
    torch.manual_seed(0)
    save_tokenizer(VQKD(cfg), tmp_path / "tok")
    url = f"{base}/images/shard-{{000000..000001}}.tar"
    assert (
        main(["encode", "--tokenizer", str(tmp_path / "tok"), "--shards", url, "--out", str(tmp_path / "o")])
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["shards"] == ["shard-000000.tar", "shard-000001.tar"] and info["num_samples"] == 20
    from_http = _samples(tmp_path / "o" / "shard-000001.tar")
    original = _samples(root / "images" / "shard-000001.tar")
    assert [s["jpg"] for _, s in from_http] == [s["jpg"] for _, s in original]
    assert all("tok.npy" in s for _, s in from_http)
    tok = load(tmp_path / "tok")
    assert main(["eval", "--tokenizer", str(tmp_path / "tok"), "--shards", url, "--limit", "12"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_tokens"] == 12 * 16 and 0 < out["usage"] <= 1 and tok.codebook_size == 16
    assert main(["encode", "--tokenizer", str(tmp_path / "tok"), "--shards", url, "--in-place"]) == 2
    assert "only local shards can be rewritten in place" in capsys.readouterr().err
