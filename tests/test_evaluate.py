"""The k-sample evaluation's pass shape: chosen for the device unless the config sets it."""

from __future__ import annotations

import pytest
import torch

from vaeflow.run.evaluate import SAMPLES_PER_PASS, eval_pass_shape


def test_pass_shape_targets_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # k = 5000 on a CPU: one example's 1,000 samples per pass; on a GPU: 20 examples x 5000.
    assert eval_pass_shape(5000, cpu) == (1, 1000)
    assert eval_pass_shape(5000, cuda) == (20, 5000)
    # Small k: the batch takes what the chunk cannot.
    assert eval_pass_shape(100, cpu) == (10, 100)
    for device in (cpu, cuda):
        for k in (1, 7, 100, 5000, 50000):
            b, c = eval_pass_shape(k, device)
            assert 1 <= c <= k and b >= 1
            assert b * c <= SAMPLES_PER_PASS[device.type]
            assert b * c >= min(k, SAMPLES_PER_PASS[device.type]) // 2


def test_given_values_are_kept() -> None:
    cpu = torch.device("cpu")
    assert eval_pass_shape(5000, cpu, chunk=500, batch_size=20) == (20, 500)
    assert eval_pass_shape(5000, cpu, chunk=250) == (4, 250)
    assert eval_pass_shape(5000, cpu, batch_size=4) == (4, 250)


def test_conv_decoders_and_other_devices_get_smaller_passes() -> None:
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert eval_pass_shape(5000, cuda, conv=True) == (1, 5000)
    assert eval_pass_shape(5000, cpu, conv=True) == (1, 1000)
    assert eval_pass_shape(100, cuda, conv=True) == (50, 100)
    assert eval_pass_shape(5000, mps) == eval_pass_shape(5000, cpu)


# ----------------------------------------------------------------------------- resumable


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 20-step real MNIST run (TINY of test_train), trained once for the tests below."""
    from tests.test_train import _cfg
    from vaeflow.run.train import train

    run_dir = tmp_path_factory.mktemp("eval") / "run"
    train(
        _cfg("train.steps=20", "train.val_every=20", "eval.n_test=60", "eval.batch_size=10"),
        run_dir,
    )
    (run_dir / "summary.json").unlink(missing_ok=True)  # train() alone does not evaluate
    return run_dir


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Make the ``calls``-th batch of the k-sample estimator raise KeyboardInterrupt."""
    from vaeflow.models.vae import VAE

    real, seen = VAE.log_likelihood, [0]

    def flaky(self, *args, **kwargs):
        seen[0] += 1
        if seen[0] == calls:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "log_likelihood", flaky)


def test_an_interrupted_evaluation_resumes_to_the_same_numbers(
    short_run, tmp_path, monkeypatch, capsys
):
    """Killed after two of six batches, the evaluation leaves its scores and random state
    in ``eval_partial.*.pt`` (no summary.json); the next call scores the other four
    batches only and writes exactly what an uninterrupted evaluation writes, then removes
    the partial file."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.run import evaluate as ev

    monkeypatch.setattr(ev, "PARTIAL_EVERY_S", 0.0)  # save after every batch
    args = {"data_root": DATA, "k": 20, "chunk": 7}
    whole = tmp_path / "whole"
    shutil.copytree(short_run, whole)
    reference = ev.evaluate_run(whole, **args)
    assert reference["test/n_examples"] == 60 and not list(whole.glob("eval_partial.*"))
    # Each save says how far it got and how long the rest takes at this rate.
    progress = [line for line in capsys.readouterr().out.splitlines() if "min left" in line]
    assert progress[0].startswith("evaluation: 10 of 60 test examples scored (")
    assert progress[-1].startswith("evaluation: 60 of 60") and "about 0 min left" in progress[-1]

    run = tmp_path / "interrupted"
    shutil.copytree(short_run, run)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate_run(run, **args)
    (partial,) = run.glob("eval_partial.*.pt")
    assert not (run / "summary.json").exists()
    assert ev.load_checkpoint(partial)["n_done"] == 20  # batch size 10: two batches scored

    counted = []
    real = ev.VAE.log_likelihood
    monkeypatch.setattr(
        ev.VAE, "log_likelihood", lambda self, *a, **kw: counted.append(1) or real(self, *a, **kw)
    )
    resumed = ev.evaluate_run(run, **args)
    assert "20 of 60 test examples scored" in capsys.readouterr().out
    assert len(counted) == 4
    for name, value in reference.items():
        if name not in ("run_dir", "test/seconds_per_example"):
            assert resumed[name] == value, name
    assert not list(run.glob("eval_partial.*"))


def test_a_partial_of_another_evaluation_or_unreadable_is_not_used(
    short_run, tmp_path, monkeypatch
):
    """Another setting (k) keeps its own partial file; a corrupt one is reported and the
    evaluation starts over -- never a mix of two evaluations' scores."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.run import evaluate as ev

    monkeypatch.setattr(ev, "PARTIAL_EVERY_S", 0.0)
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate_run(run, data_root=DATA, k=20, chunk=7)
    (k20,) = run.glob("eval_partial.*.pt")
    ev.evaluate_run(run, data_root=DATA, k=5, chunk=5)  # another k: its own file
    assert k20.exists() and len(list(run.glob("eval_partial.*.pt"))) == 1
    k20.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        result = ev.evaluate_run(run, data_root=DATA, k=20, chunk=7)
    assert result["test/n_examples"] == 60 and not k20.exists()


# ----------------------------------------------------------------------------- growing


def _count_batches(monkeypatch) -> list[int]:
    """Record the batch size of every call of the k-sample estimator."""
    from vaeflow.run import evaluate as ev

    seen: list[int] = []
    real = ev.VAE.log_likelihood

    def counting(self, x, *args, **kwargs):
        seen.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(ev.VAE, "log_likelihood", counting)
    return seen


def test_an_evaluation_grows_to_more_images_scoring_only_the_new_ones(
    short_run, tmp_path, monkeypatch
):
    """20 images scored, then 60 asked for: the fixed random subsets are nested, so only
    the 40 others are scored; the 20 keep their scores exactly, the summary's metrics are
    those of the 60 merged scores, and it says what it extended."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.data import test_subset
    from vaeflow.run import evaluate as ev

    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    args = {"data_root": DATA, "k": 20, "chunk": 7}
    small = ev.evaluate_run(run, n_test=20, **args)
    (growth,) = run.glob("test_scores.*.pt")  # every image's scores, per estimator
    first = ev.load_checkpoint(growth)
    seen = _count_batches(monkeypatch)
    grown = ev.evaluate_run(run, n_test=60, **args)
    assert sum(seen) == 40
    assert grown["test/n_examples"] == 60 and small["test/n_examples"] == 20
    assert grown["extended_from"] == small["test_examples"] != grown["test_examples"]
    stored = ev.load_checkpoint(growth)
    n_total = int(grown["test_examples"].rsplit(" ", 1)[1])
    assert torch.equal(stored["indices"], test_subset(n_total, 60)[0])
    reused = torch.isin(stored["indices"], first["indices"])
    assert int(reused.sum()) == 20
    for name, values in first["per_example"].items():
        assert torch.equal(stored["per_example"][name][reused], values), name
    lp = stored["per_example"]["log_px"]
    assert grown["test/nll_iw20_nats"] == pytest.approx(-lp.mean().item(), abs=1e-9)
    assert grown["test/elbo_nats"] == pytest.approx(
        stored["per_example"]["elbo"].mean().item(), abs=1e-9
    )
    last = ev.load_checkpoint(run / ev.TEST_SCORES)  # what `vaeflow compare` pairs
    assert torch.equal(last["indices"], stored["indices"]) and torch.equal(last["log_px"], lp)
    # The new images' noise is not the first pass's stream: a one-pass evaluation of the
    # 60 gives other estimates for the 40 (same images, independent draws).
    fresh = ev.evaluate_run(run, n_test=60, reuse=False, **args)
    assert "extended_from" not in fresh and sum(seen) == 40 + 60
    again = ev.load_checkpoint(run / ev.TEST_SCORES)["log_px"]
    assert not torch.equal(again[~reused], lp[~reused])


def test_only_the_same_estimator_is_grown(short_run, tmp_path, monkeypatch):
    """Growth needs the same checkpoint (its bytes, not only its name and step), k and
    dataset; the pass shape may differ. A quick check at another k or on fewer images in
    between does not lose the scores to grow from; the same images are scored again."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.run import evaluate as ev

    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    seen = _count_batches(monkeypatch)
    ev.evaluate_run(run, data_root=DATA, n_test=20, k=20, chunk=7)
    ev.evaluate_run(run, data_root=DATA, n_test=10, k=5, chunk=5)  # a quick other-k check
    assert sum(seen) == 30
    grown = ev.evaluate_run(run, data_root=DATA, n_test=40, k=20, chunk=4)
    assert sum(seen) == 50 and "extended_from" in grown
    assert [(p["examples"], p["chunk"]) for p in grown["passes"]] == [(20, 7), (20, 4)]
    same = ev.evaluate_run(run, data_root=DATA, n_test=40, k=20, chunk=7)
    assert sum(seen) == 90 and "extended_from" not in same
    fewer = ev.evaluate_run(run, data_root=DATA, n_test=30, k=20, chunk=7)
    assert sum(seen) == 120 and "extended_from" not in fewer
    stored = [ev.load_checkpoint(f) for f in run.glob("test_scores.*.pt")]
    assert sorted(len(r["indices"]) for r in stored) == [10, 40]  # per estimator, largest
    # Other weights under the same name and step (a run retrained after a fix): no merge.
    path = ev.ckpt_path(run, grown["checkpoint"])
    ckpt = ev.load_checkpoint(path)
    for t in ckpt["model"].values():
        if t.is_floating_point():
            t.add_(0.01)
    if ckpt.get("ema") is not None:
        for t in ckpt["ema"].values():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.add_(0.01)
    ev.save_checkpoint(path, ckpt)
    retrained = ev.evaluate_run(run, data_root=DATA, n_test=60, k=20, chunk=7)
    assert sum(seen) == 180 and "extended_from" not in retrained


def test_merge_puts_every_score_on_its_image() -> None:
    """New scores land on the images they were computed for (in the evaluation's order),
    earlier ones on theirs, whatever order the earlier file kept them in."""
    from vaeflow.run.evaluate import _merge_scores

    order = torch.tensor([1, 3, 4, 6, 8, 9])
    earlier = {
        "indices": torch.tensor([8, 3]),
        "per_example": {
            "log_px": torch.tensor([80.0, 30.0]),
            "kl_dims": torch.tensor([[8.0, -8.0], [3.0, -3.0]]),
        },
    }
    todo = ~torch.isin(order, earlier["indices"])
    new_images = order[todo]
    new = {
        "log_px": new_images * 10.0,
        "kl_dims": torch.stack([new_images, -new_images], 1).double(),
    }
    merged = _merge_scores(order, todo, new, earlier)
    assert torch.equal(merged["log_px"], order * 10.0)
    assert torch.equal(merged["kl_dims"], torch.stack([order, -order], 1).double())


def test_an_unusable_growth_file_is_reported_and_every_image_scored(
    short_run, tmp_path, monkeypatch
):
    """A growth file with a field missing, scores of the wrong length, or no scores at
    all gives a warning and a full evaluation -- never a crash or a half-merge."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.run import evaluate as ev

    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    ev.evaluate_run(run, data_root=DATA, n_test=20, k=5, chunk=5)
    (path,) = run.glob("test_scores.*.pt")
    good = ev.load_checkpoint(path)
    seen = _count_batches(monkeypatch)
    broken = [
        {**good, "per_example": {n: v for n, v in good["per_example"].items() if n != "ess"}},
        {**good, "per_example": {n: v[:5] for n, v in good["per_example"].items()}},
        {n: v for n, v in good.items() if n != "indices"},
    ]
    for i, record in enumerate(broken, start=1):
        ev.save_checkpoint(path, record)
        with pytest.warns(UserWarning, match="scoring every image"):
            result = ev.evaluate_run(run, data_root=DATA, n_test=30, k=5, chunk=5)
        assert "extended_from" not in result and sum(seen) == 30 * i
        ev.save_checkpoint(path, good)


def test_an_interrupted_growth_resumes_to_the_same_numbers(short_run, tmp_path, monkeypatch):
    """The growth keeps a partial file of its own and resumes to what an uninterrupted
    growth writes."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.run import evaluate as ev

    monkeypatch.setattr(ev, "PARTIAL_EVERY_S", 0.0)
    args = {"data_root": DATA, "k": 20, "chunk": 7}
    runs = []
    for name in ("whole", "interrupted"):
        run = tmp_path / name
        shutil.copytree(short_run, run)
        ev.evaluate_run(run, n_test=20, **args)
        runs.append(run)
    reference = ev.evaluate_run(runs[0], n_test=60, **args)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate_run(runs[1], n_test=60, **args)
    (partial,) = runs[1].glob("eval_partial.*.pt")
    assert ev.load_checkpoint(partial)["key"]["extends"] == reference["extended_from"]
    resumed = ev.evaluate_run(runs[1], n_test=60, **args)
    for name, value in reference.items():
        if name not in ("run_dir", "test/seconds_per_example", "passes"):
            assert resumed[name] == value, name
    drop_time = [{f: v for f, v in p.items() if f != "seconds"} for p in reference["passes"]]
    assert [{f: v for f, v in p.items() if f != "seconds"} for p in resumed["passes"]] == drop_time
    assert not list(runs[1].glob("eval_partial.*"))


def test_eval_cli_fresh_scores_every_image(short_run, tmp_path, monkeypatch):
    """`vaeflow eval --n-test N` grows an earlier evaluation; `--fresh` does not."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.cli import main as cli_main

    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    base = ["eval", str(run), "--k", "5", "--chunk", "5", "--data-root", str(DATA)]
    assert cli_main([*base, "--n-test", "20"]) == 0
    seen = _count_batches(monkeypatch)
    assert cli_main([*base, "--n-test", "30"]) == 0 and sum(seen) == 10
    assert cli_main([*base, "--n-test", "40", "--fresh"]) == 0 and sum(seen) == 50


def test_an_interrupted_full_evaluation_is_resumed_not_grown(short_run, tmp_path, monkeypatch):
    """With a growth file of 20 images and an interrupted --fresh evaluation of the 60,
    a plain evaluation of the 60 continues the interrupted one."""
    import shutil

    from tests.test_train import DATA
    from vaeflow.run import evaluate as ev

    monkeypatch.setattr(ev, "PARTIAL_EVERY_S", 0.0)
    run = tmp_path / "run"
    shutil.copytree(short_run, run)
    args = {"data_root": DATA, "k": 5, "chunk": 5, "n_test": 60}
    ev.evaluate_run(run, **{**args, "n_test": 20})
    with monkeypatch.context() as m:
        _interrupt_after(m, 5)  # four of six batches scored
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate_run(run, reuse=False, **args)
    seen = _count_batches(monkeypatch)
    result = ev.evaluate_run(run, **args)
    assert sum(seen) == 20 and "extended_from" not in result


def test_a_model_trained_with_the_chain_rule_scores_like_a_rebuilt_one() -> None:
    """Training turns ``kl_chain_rule`` on for free bits with a mixture prior; scoring the
    same model object afterwards gives the fields and numbers of a freshly built one (no
    chain-rule per-dimension KL), and leaves the flag as it was."""
    from vaeflow.config import ModelConfig, from_dict
    from vaeflow.models.build import build_model
    from vaeflow.run.evaluate import _score_fields, score_examples

    spec = {
        "x_shape": [1, 4, 4],
        "latent_dim": 4,
        "encoder": {"name": "mlp", "options": {"hidden": [8]}},
        "decoder": {"name": "mlp", "options": {"hidden": [8]}},
        "prior": {"name": "mog", "options": {"num_components": 3}},
    }
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, spec))
    x = (torch.rand(6, 1, 4, 4) < 0.5).float()
    torch.manual_seed(1)
    plain, _ = score_examples(model, x, k=4, chunk=2, batch_size=3)
    model.kl_chain_rule = True
    assert model(x, k=1).kl_dims is not None  # on: training's per-group terms
    assert _score_fields(model, x) == set(plain)
    torch.manual_seed(1)
    scored, _ = score_examples(model, x, k=4, chunk=2, batch_size=3)
    assert set(scored) == set(plain) and "kl_dims" not in scored
    for name in plain:
        torch.testing.assert_close(scored[name], plain[name])
    assert model.kl_chain_rule
