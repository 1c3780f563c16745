"""Per-token LM outputs through the real precompute CLI: a tiny GPT teacher trained here, real token
shards, real local Ray and Zarr; stored fields checked against a direct forward of the same teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from kdstore.cli.main import main
from kdstore.pipeline.lm_corpus import read_npy
from kdstore.pipeline.lm_teacher import load_lm
from kdstore.pipeline.token_reduce import sample_tokens
from kdstore.store import layout, open_store
from kdstore.store.errors import InputError
from kdstore.store.schema import (
    TOKENS_SAMPLE_COUNTS,
    TOKENS_SAMPLE_IDS,
    TOKENS_TOPK_IDS,
    TOKENS_TOPK_LOGPROBS,
    TOKENS_TOPK_LSE,
    TOKENS_TOPK_RESIDUAL,
    OutputSpec,
    tokens_field,
)
from lm_fixture import build_lm, precompute

T = 2.0
K, S, SEED = 8, 12, 5
OUTPUTS = (f"tokens:topk:{K}", f"tokens:sample:{S}", "tokens:ids")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return build_lm(tmp_path_factory.mktemp("lmp"))


def _precompute(store, teacher, tars):
    precompute(store, teacher, tars, OUTPUTS, temperature=T, seed=SEED)
    return open_store(store)


def _direct(teacher_dir, tars):
    """Keys, input ids and a plain forward of the teacher over every sample, in shard order."""
    model, _, _ = load_lm(teacher_dir)
    rows = []
    for tar in tars:
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            ids, doc = read_npy(s["ids.npy"]), read_npy(s["doc.npy"])
            with torch.inference_mode():
                logits = model(torch.from_numpy(ids).long()[None], torch.from_numpy(doc).long()[None])[0].double()
            rows.append((s["__key__"], ids, logits))
    return rows


def test_output_spec_token_kinds():
    top, samp = OutputSpec.parse("tokens:topk:32"), OutputSpec.parse("tokens:sample:12")
    assert (top.token_reduce, top.k, top.source, top.to_text()) == ("topk", 32, "tokens/logits", "tokens:topk:32")
    assert top.fields() == [TOKENS_TOPK_LOGPROBS, TOKENS_TOPK_IDS, TOKENS_TOPK_RESIDUAL, TOKENS_TOPK_LSE]
    assert samp.fields() == [TOKENS_SAMPLE_IDS, TOKENS_SAMPLE_COUNTS] and samp.to_text() == "tokens:sample:12"
    raw = OutputSpec.parse("tokens:ids")
    assert raw.token_reduce == "" and raw.fields() == [tokens_field("ids")]
    for bad in ("tokens:topk:0", "tokens:sample:256", "tokens:topk:x", "tokens:median:3"):
        with pytest.raises(InputError):
            OutputSpec.parse(bad)


def test_token_outputs_equal_direct_forward_across_shards_and_resume(lm, tmp_path, ray_session):
    teacher_dir, tars = lm
    store = _precompute(tmp_path / "store", teacher_dir, tars)
    t = store.teacher("gpt")
    assert t.spec.output("tokens").temperature == T
    fields = t.fields
    # dtypes are the reduce ops' own (not the float16 of --dtype), ids packed for V = 512
    assert fields[TOKENS_TOPK_LOGPROBS].dtype == "float16" and fields[TOKENS_TOPK_IDS].dtype == "uint16"
    assert fields[TOKENS_TOPK_RESIDUAL].dtype == "float32" and fields[TOKENS_TOPK_LSE].dtype == "float32"
    assert fields[TOKENS_SAMPLE_IDS].dtype == "uint16" and fields[TOKENS_SAMPLE_COUNTS].dtype == "uint8"
    assert fields[tokens_field("ids")].dtype == "int32"  # was cast to float16 before
    assert fields[TOKENS_TOPK_IDS].shape == (K,) and fields[TOKENS_SAMPLE_IDS].shape == (S,)

    def stored():
        out = {}
        for shard in store.shards:
            cols = {f: t.read_tokens(f, shard.index) for f in t.spec.fields()}
            for i in range(shard.num_rows):
                out[shard.row_start + i] = {f: cols[f][i] for f in cols}
        return out

    got = stored()
    direct = _direct(teacher_dir, tars)
    assert len(got) == len(direct) == store.num_rows
    keys = store.samples().column("key").to_pylist()
    for row, (key, ids, logits) in enumerate(direct):
        g = got[row]
        assert keys[row] == key
        np.testing.assert_array_equal(g[tokens_field("ids")], ids)
        x = logits / T
        logp = torch.log_softmax(x, dim=1)
        top = torch.topk(x, K + 1, dim=1)
        sid = g[TOKENS_TOPK_IDS].astype(np.int64)
        gaps = top.values.diff(dim=1).abs().numpy()
        untied = (gaps > 1e-6).all(1)  # ids compared exactly where no two of the top K + 1 tie
        assert untied.mean() > 0.9
        np.testing.assert_array_equal(sid[untied], top.indices[:, :K].numpy()[untied])
        np.testing.assert_allclose(g[TOKENS_TOPK_LOGPROBS].astype(np.float64), logp.gather(1, torch.from_numpy(sid)).numpy(),
                                   rtol=1e-3, atol=2e-3)
        np.testing.assert_allclose(g[TOKENS_TOPK_RESIDUAL], 1.0 - logp.exp().gather(1, torch.from_numpy(sid)).sum(1).numpy(),
                                   atol=1e-5)
        np.testing.assert_allclose(g[TOKENS_TOPK_LSE], torch.logsumexp(x, dim=1).numpy(), rtol=1e-5, atol=1e-5)
        # LSE consistent with the stored log-probs: logp + lse recovers logits / T
        np.testing.assert_allclose(g[TOKENS_TOPK_LOGPROBS].astype(np.float64) + g[TOKENS_TOPK_LSE][:, None],
                                   x.gather(1, torch.from_numpy(sid)).numpy(), rtol=2e-3, atol=2e-2)
        want = sample_tokens(logits.float(), S, key=key, temperature=T, seed=SEED)
        np.testing.assert_array_equal(g[TOKENS_SAMPLE_IDS], want["ids"])
        np.testing.assert_array_equal(g[TOKENS_SAMPLE_COUNTS], want["counts"])
        assert (g[TOKENS_SAMPLE_COUNTS].sum(1) == S).all()

    # kdstore info: bytes per token per ragged field
    info = CliRunner().invoke(main, ["info", str(store.path), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output[info.output.index("{"):])
    per = {f["field"]: f for f in summary["teachers"][0]["fields"]}
    n_tokens = sum(len(ids) for _, ids, _ in direct)
    assert per[TOKENS_TOPK_IDS]["tokens"] == n_tokens and per[TOKENS_TOPK_IDS]["raw_bytes_per_token"] == 2 * K
    assert per[TOKENS_SAMPLE_COUNTS]["raw_bytes_per_token"] == S and per[TOKENS_TOPK_LSE]["bytes_per_token"] > 0
    text = CliRunner().invoke(main, ["info", str(store.path)]).output
    assert f"{TOKENS_TOPK_IDS}:" in text and "bytes/token" in text

    # resume: a shard whose done record is lost is recomputed to the same values
    (layout.done_path(store.path, "gpt", 1)).unlink()
    assert t.missing_shards() == [1]
    _precompute(tmp_path / "store", teacher_dir, tars)
    again = stored()
    for row in got:
        for f in got[row]:
            np.testing.assert_array_equal(again[row][f], got[row][f])

    # the sampler is recorded; a store whose draws came from another (or an unrecorded) sampler
    # is not resumed into: its shards would mix two generators' draws
    from kdstore.pipeline.token_reduce import SAMPLER

    path = layout.teacher_file(store.path, "gpt")
    doc = json.loads(path.read_text())
    assert doc["sampler"] == SAMPLER
    del doc["sampler"]
    path.write_text(json.dumps(doc))
    (layout.done_path(store.path, "gpt", 1)).unlink()
    args = ["precompute", "--store", str(tmp_path / "store"), "--teacher", "kdstore.pipeline.lm_teacher:gpt",
            "--teacher-arg", f"path={teacher_dir}", "--teacher-name", "gpt", "--temperature", str(T), "--seed", str(SEED),
            "--workers", "1", "--no-progress", *[a for o in OUTPUTS for a in ("--output", o)],
            *[a for t in tars for a in ("--inputs", str(t))]]
    refused = CliRunner().invoke(main, args)
    said = refused.output + refused.stderr
    assert refused.exit_code == 2 and f"sampler: stored '', now {SAMPLER!r}" in said, said
