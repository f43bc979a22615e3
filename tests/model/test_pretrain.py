"""HPGR's session-based masked item modelling: the masks, no leak of validation or test
events, the saved encoder, fine-tuning from it (`init_from`), and refusing logs without
timestamps."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hytrec.model.data import DataError, timestamps_are_positions
from hytrec.model.evaluate import history_batch, leave_one_out
from hytrec.model.hpgr import HPGR, HPGRConfig
from hytrec.model.pretrain import MaskedItemModel, MIMConfig, draw_masks, pretrain, save
from hytrec.model.registry import build_model, load_model
from hytrec.model.sasrec import SASRecConfig
from hytrec.model.synthetic import SyntheticConfig, generate, revisiting_log
from hytrec.model.train import TrainConfig, train
from tests.test_data import log_of

TINY = HPGRConfig(d_model=16, heads=2, max_len=40, top_k=None)
MIM = MIMConfig(model=TINY, max_len=40, negatives=64, epochs=2, batch_size=16)


def synthetic_log():
    """30 users of 20-40 events in sessions (6 h gaps between them)."""
    return generate(
        SyntheticConfig(users=30, min_events=20, max_events=40, categories=5, items_per_category=20)
    )


# ---------------------------------------------------------------------------- masks


def test_item_masking_masks_the_mask_ratio_of_real_events_and_never_padding():
    generator = torch.Generator().manual_seed(0)
    real = torch.arange(100)[None] < torch.tensor([[100], [60]])  # [2, 100]
    session = torch.zeros(2, 100, dtype=torch.long)
    cfg = replace(MIM, session_share=0.0)
    masked = torch.stack([draw_masks(real, session, cfg, generator) for _ in range(10_000)])
    assert not masked[:, ~real].any()
    assert abs(masked[:, real].float().mean().item() - cfg.mask_ratio) <= 0.01


def test_session_masking_masks_whole_sessions_at_the_session_ratio():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([50, 31])
    real = torch.arange(50)[None] < lengths[:, None]
    session = (torch.arange(50) // 5)[None].expand(2, -1)  # sessions of 5 events
    cfg = replace(MIM, session_share=1.0)
    draws = torch.stack([draw_masks(real, session, cfg, generator) for _ in range(4_000)])
    assert not draws[:, ~real].any()
    for row, n in enumerate(lengths.tolist()):
        per_session = draws[:, row, :n].reshape(4_000, -1, 5) if n % 5 == 0 else None
        if per_session is not None:  # all or none of each session's events
            assert (per_session.all(-1) | ~per_session.any(-1)).all()
    whole = draws[:, 0, ::5].float().mean().item()  # each session's first event
    assert abs(whole - cfg.session_mask_ratio) <= 0.01


# ---------------------------------------------------------------------------- pre-training


def test_pretraining_uses_training_events_only_and_saves_an_encoder(tmp_path):
    log = synthetic_log()
    split = leave_one_out(log)
    result = pretrain(MIM, log, split, progress=False)
    assert result.leaked_targets == 0 and result.masked_targets > 0
    assert len(result.history) == 2 and result.best_epoch in (1, 2)
    assert result.sessions > 30  # at least one per user
    loaded = load_model(save(result, MIM, tmp_path / "mim"))
    assert type(loaded) is HPGR and loaded.version == result.model.version
    assert loaded.checkpoint_extra["pretrain"]["leaked_targets"] == 0


def test_a_window_reaching_past_the_training_events_is_counted_as_a_leak(monkeypatch):
    """The counter reads each masked event's log index against its user's train_stop, not
    the windows: windows cut one event too far (the planted bug) show up."""
    from hytrec.model import pretrain as module

    honest = module.mim_windows
    monkeypatch.setattr(
        module, "mim_windows", lambda split, max_len: honest(split, max_len, extra=1)
    )
    log = synthetic_log()
    result = pretrain(replace(MIM, epochs=1), log, leave_one_out(log), progress=False)
    assert result.leaked_targets > 0


@torch.no_grad()
def test_a_masked_event_s_item_is_never_read():
    log = synthetic_log()
    torch.manual_seed(0)
    model = MaskedItemModel(build_model(TINY, log)).eval()
    batch = history_batch(log, np.array([0, 40]), np.array([25, 70]))
    masked = torch.zeros_like(batch.item, dtype=torch.bool)
    masked[:, 3] = masked[0, 24] = masked[1, 29] = True
    other = replace(batch, item=torch.where(masked, (batch.item % 50) + 1, batch.item))
    assert not torch.equal(other.item, batch.item)
    assert torch.equal(model(other, masked), model(batch, masked))
    assert not torch.equal(model(other, masked & False), model(batch, masked & False))


def test_mim_with_its_default_loss_fills_in_revisits_of_a_sparse_catalogue_quickly():
    """Taobao's shape: 50k items, most drawn once, the rest revisits. With the default loss
    (the full softmax) the masked-item HR@10 passes 3x popularity's within 5 epochs; with
    1,024 uniform sampled negatives (2 % of the items, the loss that scored 0 on Taobao:
    the planted bug) it stays at popularity's (0.017) for those 5 epochs."""
    log = revisiting_log(users=120, items=50_000, length=(15, 30))
    split = leave_one_out(log)
    cfg = replace(MIM, epochs=5, negatives=MIMConfig().negatives, batch_size=16, lr=3e-3)
    result = pretrain(cfg, log, split, progress=False)
    best = result.history[result.best_epoch - 1]["valid_HR@10"]
    assert best >= 3 * result.popularity_hr10
    assert result.history[-1]["loss"] < result.history[0]["loss"]


# ---------------------------------------------------------------------------- fine-tuning


def test_fine_tuning_starts_from_the_pretrained_table_and_keeps_it_frozen(tmp_path):
    log = synthetic_log()
    split = leave_one_out(log)
    result = pretrain(replace(MIM, epochs=1), log, split, progress=False)
    directory = save(result, MIM, tmp_path / "mim")
    tc = TrainConfig(epochs=1, batch_size=16, max_len=40, init_from=str(directory))
    tuned = train(
        replace(TINY, top_k=4, recent=2, selection="pretrained"), log, split, tc, progress=False
    ).model
    assert torch.equal(tuned.relevance_table(), result.model.item_emb.weight)
    assert not torch.equal(tuned.item_emb.weight, result.model.item_emb.weight)  # fine-tuned
    with pytest.raises(RuntimeError, match="--init-from"):
        train(
            replace(TINY, top_k=4, selection="pretrained"),
            log,
            split,
            replace(tc, init_from=None),
            progress=False,
        )
    with pytest.raises(ValueError, match="cannot start from a pre-trained item table"):
        train(SASRecConfig(d_model=16, max_len=40), log, split, tc, progress=False)


# ---------------------------------------------------------------------------- no timestamps


def test_hpgr_refuses_logs_whose_timestamps_are_positions():
    positions = log_of([list(range(12)), list(range(7))])
    assert timestamps_are_positions(positions) and not timestamps_are_positions(synthetic_log())
    with pytest.raises(DataError, match="no times: its timestamps are each event's position"):
        build_model(TINY, positions)
    with pytest.raises(DataError, match="beauty and sports"):
        pretrain(MIM, positions, leave_one_out(positions), progress=False)
    build_model(SASRecConfig(d_model=16), positions)  # other models read positions as they are
