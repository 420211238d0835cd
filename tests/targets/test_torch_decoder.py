"""torch target decoders: the AOTInductor package driven through Session.run with public (dotted) cache names,
and the static cache (targets/static_cache.py) writing in place; each greedy step's logits against eager
transformers' generate within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import effc
from effc.runtime import open as open_artifact
from effc.runtime.kv_cache import complete_feeds, positions
from effc.runtime.torch_program import StaticCache
from effc.targets import static_cache
from effc.targets.pt2 import TorchTarget
from examples.models import build

if (_why := TorchTarget().available()) is not None:
    pytest.skip(_why, allow_module_level=True)

ATOL, STEPS, MAX_CACHE = 1e-4, 4, 32


def _prompt() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.RandomState(0).randint(0, 512, (2, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def _generate_logits(model, ids, mask) -> list[np.ndarray]:
    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                             max_new_tokens=STEPS, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return [s.numpy() for s in out.logits]


def _session_logits(session, ids, mask, layers: int) -> list[np.ndarray]:
    """Greedy steps through Session.run, each fed the previous presents as its past."""
    out = session.run({"input_ids": ids, "attention_mask": mask})
    logits = []
    for _ in range(STEPS):
        logits.append(out["logits"][:, -1])
        token = logits[-1].argmax(-1)[:, None].astype(np.int64)
        pos = positions(mask)[:, -1:] + 1
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        feeds = {"input_ids": token, "attention_mask": mask, "position_ids": pos}
        for i in range(layers):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = out[f"present.{i}.{kv}"]
        out = session.run(feeds)
    return logits


@pytest.mark.slow  # an AOTInductor compile: ~45 s alone, 2 min on a shared machine
def test_dynamic_cache_artifact_matches_generate(hf_dir, tmp_path):
    model_dir = hf_dir("llama")
    report = effc.compile(str(model_dir), tmp_path / "out", target="torch", atol=ATOL, rtol=0)
    assert report.verification["passed"]
    ids, mask = _prompt()
    model = build("llama")
    with open_artifact(tmp_path / "out") as session:
        assert "past_key_values.0.key" in [i.name for i in session.inputs]
        got = _session_logits(session, ids, mask, layers=2)
    for step, (g, ref) in enumerate(zip(got, _generate_logits(model, ids, mask))):
        np.testing.assert_allclose(g, ref, rtol=0, atol=ATOL, err_msg=f"step {step}")


@pytest.mark.slow
def test_nf4_decode_steps_match_its_prefill(hf_dir, tmp_path):
    """effc's native NF4 kernel in the cached program: each decode step equals a no-cache prefill of the same
    tokens through the same artifact (the NF4 numbers are the artifact's own, not eager's)."""
    report = effc.compile(str(hf_dir("llama")), tmp_path / "out", target="torch", passes=["nf4"], atol=ATOL, rtol=0)
    assert report.verification["passed"]
    assert any(k.startswith("effc_native::nf4") for k in report.ops)
    ids = np.random.RandomState(0).randint(0, 512, (2, 7)).astype(np.int64)
    with open_artifact(tmp_path / "out") as session:
        got = _session_logits(session, ids, np.ones_like(ids), layers=2)
        tokens = ids
        for step, g in enumerate(got[:-1]):
            tokens = np.concatenate([tokens, g.argmax(-1)[:, None].astype(np.int64)], axis=1)
            full = session.run({"input_ids": tokens})["logits"][:, -1]
            np.testing.assert_allclose(got[step + 1], full, rtol=0, atol=ATOL, err_msg=f"step {step}")


class _StaticSession:
    """Session.run's side of a static-cache artifact: feeds completed as Session.validate does, then the runner."""

    def __init__(self, program, meta: dict):
        self.meta = meta
        self.cache = StaticCache(program, meta["layers"], meta["kv_heads"], meta["head_dim"], max_cache=MAX_CACHE)
        self.copies = 0

    def run(self, feeds: dict) -> dict:
        names = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{kv}"
                 for i in range(self.meta["layers"]) for kv in ("key", "value"))]
        feeds = complete_feeds(feeds, self.meta["kv_heads"], self.meta["head_dim"], names)
        key = self.cache.past.get("past_key_values_0_key")
        self.copies += not (key is not None and np.shares_memory(feeds["past_key_values.0.key"], key.numpy()))
        return self.cache.run(feeds)


@pytest.fixture(scope="module")
def static_program():
    from effc import decoder

    model = build("llama")
    meta = decoder.info(model, model.config)
    return model, meta, static_cache.export(model, meta, max_cache=MAX_CACHE)


def _check_static(program, model, meta) -> _StaticSession:
    session = _StaticSession(program, meta)
    ids, mask = _prompt()
    got = _session_logits(session, ids, mask, layers=meta["layers"])
    for step, (g, ref) in enumerate(zip(got, _generate_logits(model, ids, mask))):
        np.testing.assert_allclose(g, ref, rtol=0, atol=ATOL, err_msg=f"step {step}")
    assert session.copies == 1  # the prefill's empty past; every decode step fed back the buffers' views
    assert session.cache.length == 7 + STEPS
    return session


def test_static_cache_program_matches_generate(static_program):
    model, meta, program = static_program
    _check_static(program.module(), model, meta)


def test_static_cache_takes_a_foreign_past(static_program):
    """A past that is not the runner's own (another session's presents) is copied in, with the same result."""
    model, meta, program = static_program
    ids, mask = _prompt()
    first = _StaticSession(program.module(), meta).run({"input_ids": ids, "attention_mask": mask})
    token = first["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
    feeds = {"input_ids": token, "attention_mask": np.concatenate([mask, np.ones_like(token)], 1),
             "position_ids": positions(mask)[:, -1:] + 1,
             **{n.replace("present", "past_key_values"): v.copy() for n, v in first.items() if n != "logits"}}
    other = _StaticSession(program.module(), meta)
    got = other.run(feeds)["logits"][:, -1]
    ref = _generate_logits(model, ids, mask)[1]
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_static_cache_aoti_writes_in_place(static_program, tmp_path):
    """AOTInductor keeps the index_copy_ in place: decode reads what earlier steps wrote into the runner's
    buffers (a functionalized program would leave them zero and the logits would differ)."""
    model, meta, program = static_program
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "static.pt2"))
    session = _check_static(torch._inductor.aoti_load_package(path), model, meta)
    key = session.cache.past["past_key_values_0_key"]
    assert key[:, :, : session.cache.length].abs().sum(-1).gt(0).all()
    assert key[:, :, session.cache.length:].eq(0).all()


@pytest.mark.slow
def test_static_cache_artifact_through_session(hf_dir, tmp_path, monkeypatch):
    """TorchTarget.static_cache: the artifact holds both programs; Session.run decodes through the static one
    (verified by the compile, then against generate) and a run longer than it goes to the dynamic one."""
    monkeypatch.setattr(TorchTarget, "static_cache", 160)  # the verification's long prefill (128) fits
    report = effc.compile(str(hf_dir("llama")), tmp_path / "out", target="torch", atol=ATOL, rtol=0)
    assert report.verification["passed"]
    model = build("llama")
    ids, mask = _prompt()
    with open_artifact(tmp_path / "out") as session:
        assert session.manifest["target"]["static_cache"]["max_cache"] == 160
        got = _session_logits(session, ids, mask, layers=2)
        assert session._session._static.length == 7 + STEPS
        long = np.random.RandomState(1).randint(0, 512, (1, 200)).astype(np.int64)
        np.testing.assert_allclose(session.run({"input_ids": long})["logits"][:, -1],
                                   model(torch.as_tensor(long)).logits[:, -1].detach().numpy(), rtol=0, atol=ATOL)
    for step, (g, ref) in enumerate(zip(got, _generate_logits(model, ids, mask))):
        np.testing.assert_allclose(g, ref, rtol=0, atol=ATOL, err_msg=f"step {step}")
