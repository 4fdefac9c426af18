"""XKD student/teacher wiring: gradient flow, EMA, variant sharing, ablations, teacher input, centering,
oracle targets, and a tiny model overfitting one batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xkd.model import XKD, ModelConfig, XKDTeacher
from xkd.model.losses import mmd


def step_outputs(
    student: XKD, teacher: XKDTeacher | None, views, seed: int = 0, **kwargs
) -> dict[str, torch.Tensor]:
    targets = teacher(*views, temp_video=0.1, temp_audio=0.07) if teacher is not None else None
    torch.manual_seed(seed)  # same masks for every model given the same seed
    return student(*views, targets=targets, **kwargs)


@pytest.mark.parametrize("variant", ["xkd", "mas", "mats"])
def test_gradients_reach_every_student_parameter_and_no_teacher_parameter(tiny, views, variant: str) -> None:
    cfg = tiny(variant=variant)
    student = XKD(cfg)
    teacher = XKDTeacher(student)
    step_outputs(student, teacher, views(cfg))["loss"].backward()
    for name, p in student.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (
            f"{name} has a zero or non-finite gradient"
        )
    for name, p in teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, f"teacher {name} has a gradient"
    assert {n for n, _ in teacher.named_buffers()} == {"center_video", "center_audio"}
    assert not any(n.startswith("decoder") for n, _ in teacher.named_parameters())


def test_ema_momentum_zero_copies_and_one_keeps(tiny) -> None:
    student = XKD(tiny())
    teacher = XKDTeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.update(student, momentum=1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    teacher.update(student, momentum=0.0)
    for part in ("encoder", "head"):
        for m in ("video", "audio"):
            src = getattr(student, part)[m].state_dict()
            for k, v in getattr(teacher, part)[m].state_dict().items():
                assert torch.equal(v, src[k]), f"{part}.{m}.{k} was not copied"
    with pytest.raises(TypeError, match="unwrapped"):
        teacher.update(torch.nn.Linear(2, 2), momentum=0.5)


def test_variant_sharing(tiny) -> None:
    students = {v: XKD(tiny(variant=v)) for v in ("xkd", "mas", "mats")}
    teachers = {v: XKDTeacher(s) for v, s in students.items()}
    # Separate per modality in every variant: patch embedding, CLS, pos-embed, final LN, decoders, heads.
    for s in students.values():
        video, audio = s.encoder["video"], s.encoder["audio"]
        for name in ("patch_embed", "norm"):
            assert getattr(video, name) is not getattr(audio, name)
        assert video.cls_token is not audio.cls_token and video.pos_embed is not audio.pos_embed
        assert s.decoder["video"] is not s.decoder["audio"] and s.head["video"] is not s.head["audio"]
    # Student blocks: separate in XKD, one stack in MAS and MATS.
    assert students["xkd"].encoder["video"].blocks is not students["xkd"].encoder["audio"].blocks
    for v in ("mas", "mats"):
        assert students[v].encoder["video"].blocks is students[v].encoder["audio"].blocks
    # Teacher blocks: separate in XKD and MAS (copies of the one student stack), shared in MATS.
    for v in ("xkd", "mas"):
        assert teachers[v].encoder["video"].blocks is not teachers[v].encoder["audio"].blocks
    assert teachers["mats"].encoder["video"].blocks is teachers["mats"].encoder["audio"].blocks
    # Parameter counts: sharing removes exactly one block stack.
    stack = sum(p.numel() for p in students["xkd"].encoder["audio"].blocks.parameters())
    count = {v: sum(p.numel() for p in s.parameters()) for v, s in students.items()}
    assert count["xkd"] - count["mas"] == stack and count["mas"] == count["mats"]
    t_count = {v: sum(p.numel() for p in t.parameters()) for v, t in teachers.items()}
    assert t_count["xkd"] == t_count["mas"] == t_count["mats"] + stack


@pytest.mark.parametrize("variant", ["xkd", "mas", "mats"])
def test_every_teacher_parameter_moves_exactly_once_per_update(tiny, variant: str) -> None:
    student = XKD(tiny(variant=variant))
    teacher = XKDTeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        for p in teacher.parameters():
            p.fill_(0.0)
    teacher.update(student, momentum=0.5)
    for name, p in teacher.named_parameters(remove_duplicate=False):
        assert torch.all(p == 0.5), f"{name}: {p.flatten()[0].item()} (0.75 would mean two EMA updates)"
    if variant == "mas":  # both teacher stacks follow the one shared student stack
        sv, sa = (teacher.encoder[m].blocks.state_dict() for m in ("video", "audio"))
        assert all(torch.equal(sv[k], sa[k]) for k in sv)


def test_ablations_remove_exactly_their_term(tiny, views) -> None:
    full_cfg = tiny(objective="full")
    full = XKD(full_cfg)
    teacher = XKDTeacher(full)
    batch = views(full_cfg)
    targets = teacher(*batch, temp_video=0.1, temp_audio=0.07)
    outs = {}
    for objective in ("full", "mr_kd", "mr_da", "mr", "mr_video"):
        model = XKD(tiny(objective=objective))
        missing, unexpected = model.load_state_dict(full.state_dict(), strict=False)
        assert not missing, f"{objective}: {missing}"
        torch.manual_seed(0)
        outs[objective] = model(*batch, targets=targets if model.cfg.uses_kd else None)
    full_out = outs["full"]
    terms = {k for k in full_out if not k.startswith("diag/")}
    assert terms == {
        "loss",
        "recon",
        "recon_video",
        "recon_audio",
        "kd_a2v",
        "kd_v2a",
        "kd",
        "da",
        "da_student",
        "da_teacher",
    }
    keys = {o: {k for k in out if not k.startswith("diag/")} for o, out in outs.items()}
    assert keys["mr_kd"] == terms - {"da", "da_student", "da_teacher"}
    assert keys["mr_da"] == {"loss", "recon", "recon_video", "recon_audio", "da"}
    assert keys["mr"] == {"loss", "recon", "recon_video", "recon_audio"}
    assert keys["mr_video"] == {"loss", "recon", "recon_video"}
    for objective, out in outs.items():  # the shared terms are the same numbers
        for k in keys[objective] - {"loss", "da"} - ({"recon"} if objective == "mr_video" else set()):
            torch.testing.assert_close(out[k], full_out[k], msg=f"{objective}/{k}")
    f = full_out
    torch.testing.assert_close(f["da"], (f["da_student"] + f["da_teacher"]) / 2)
    torch.testing.assert_close(
        f["da_teacher"], mmd(targets.logits_video, targets.logits_audio, full_cfg.mmd_gammas)
    )
    torch.testing.assert_close(f["recon"], (f["recon_video"] + f["recon_audio"]) / 2)
    torch.testing.assert_close(f["kd"], (f["kd_a2v"] + f["kd_v2a"]) / 2)
    torch.testing.assert_close(f["loss"], (f["da"] + f["kd"] + 5 * f["recon"]) / 7)
    torch.testing.assert_close(outs["mr_kd"]["loss"], (f["kd"] + 5 * f["recon"]) / 6)
    torch.testing.assert_close(outs["mr_da"]["da"], f["da_student"])  # no teacher: student-pair MMD only
    torch.testing.assert_close(outs["mr_da"]["loss"], (f["da_student"] + 5 * f["recon"]) / 6)
    torch.testing.assert_close(outs["mr"]["loss"], f["recon"])
    torch.testing.assert_close(outs["mr_video"]["loss"], f["recon_video"])
    torch.testing.assert_close(outs["mr_video"]["recon"], f["recon_video"])


def test_ablations_build_only_what_they_use(tiny) -> None:
    def parts(objective: str) -> dict[str, tuple[str, ...]]:
        s = XKD(tiny(objective=objective))
        return {p: tuple(getattr(s, p)) for p in ("encoder", "decoder", "head")}

    both = ("video", "audio")
    assert parts("mr_video") == {"encoder": ("video",), "decoder": ("video",), "head": ()}
    assert parts("mr") == {"encoder": both, "decoder": both, "head": ()}
    assert (
        parts("mr_da") == parts("mr_kd") == parts("full") == {"encoder": both, "decoder": both, "head": both}
    )
    for objective in ("mr", "mr_video", "mr_da"):
        with pytest.raises(ValueError, match="uses no teacher"):
            XKDTeacher(XKD(tiny(objective=objective)))


def test_teacher_input_and_centering(tiny, views) -> None:
    for teacher_input, tokens in (("global", (64, 16)), ("local", (8, 8))):
        cfg = tiny(teacher_input=teacher_input)
        teacher = XKDTeacher(XKD(cfg))
        batch = views(cfg, batch=4)
        first = teacher(*batch, temp_video=0.1, temp_audio=0.07)
        assert (first.weights_video.shape, first.weights_audio.shape) == ((4, tokens[0]), (4, tokens[1]))
        # Targets of this step use the old (zero) centers; the centers then move toward the batch mean.
        torch.testing.assert_close(first.probs_video, torch.softmax(first.logits_video / 0.1, -1))
        torch.testing.assert_close(first.probs_audio, torch.softmax(first.logits_audio / 0.07, -1))
        torch.testing.assert_close(teacher.center_video, 0.1 * first.logits_video.mean(0, keepdim=True))
        second = teacher(*batch, temp_video=0.1, temp_audio=0.07)
        expected = torch.softmax((second.logits_audio - 0.1 * first.logits_audio.mean(0)) / 0.07, -1)
        torch.testing.assert_close(second.probs_audio, expected)
    # Spread-relative temperatures: the first step's targets are the paper's; later steps scale the temperature by
    # the batch's output spread over the first step's.
    cfg = tiny(teacher_temp_relative=True)
    teacher = XKDTeacher(XKD(cfg))
    batch = views(cfg, batch=4)
    first = teacher(*batch, temp_video=0.1, temp_audio=0.07)
    torch.testing.assert_close(first.probs_audio, torch.softmax(first.logits_audio / 0.07, -1))
    spread0 = first.logits_audio.var(0, unbiased=False).mean().sqrt()
    torch.testing.assert_close(teacher.spread0_audio, spread0)
    second = teacher(*views(cfg, batch=8), temp_video=0.1, temp_audio=0.07)  # other clips, another spread
    temp = 0.07 * second.logits_audio.var(0, unbiased=False).mean().sqrt() / spread0
    assert abs(temp / 0.07 - 1) > 0.01  # the case tells a scaled temperature from the fixed one
    centered = second.logits_audio - 0.1 * first.logits_audio.mean(0)
    torch.testing.assert_close(second.probs_audio, torch.softmax(centered / temp, -1))
    torch.testing.assert_close(teacher.spread0_audio, spread0)
    # The local teacher sees exactly view 0.
    cfg = tiny(teacher_input="local", refine=False)
    teacher = XKDTeacher(XKD(cfg))
    vg, vl, ag, al = views(cfg)
    out = teacher(vg, vl, ag, al, temp_video=0.1, temp_audio=0.1)
    expected = teacher.head["video"](teacher.encoder["video"].forward_features(vl[0]))
    torch.testing.assert_close(out.logits_video, expected)
    assert out.weights_video is None


def test_refinement_changes_only_the_teacher_pooling(tiny, views) -> None:
    student = XKD(tiny())
    plain_student = XKD(tiny(refine=False))
    plain_student.load_state_dict(student.state_dict())
    on, off = XKDTeacher(student), XKDTeacher(plain_student)
    batch = views(tiny())
    t_on, t_off = on(*batch, temp_video=0.1, temp_audio=0.07), off(*batch, temp_video=0.1, temp_audio=0.07)
    assert not torch.allclose(t_on.logits_video, t_off.logits_video)
    assert t_off.weights_video is None and t_off.weights_audio is None
    plain = off.head["audio"](off.encoder["audio"].forward_features(batch[2]))
    torch.testing.assert_close(t_off.logits_audio, plain)


def test_oracle_targets_replace_the_audio_teacher(tiny, views) -> None:
    cfg = tiny(oracle_targets=True, oracle_num_classes=4)
    student = XKD(cfg)
    teacher = XKDTeacher(student)
    batch = views(cfg, batch=4)
    targets = teacher(*batch, temp_video=0.1, temp_audio=0.07)
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    a = student(*batch, targets=targets, labels=labels)
    targets.probs_audio = torch.rand_like(targets.probs_audio)  # ignored under the oracle
    torch.manual_seed(0)
    b = student(*batch, targets=targets, labels=labels)
    torch.testing.assert_close(a["kd_a2v"], b["kd_a2v"])
    assert a["diag/teacher_entropy_a2v"].item() == 0.0  # one-hot targets
    torch.manual_seed(0)
    c = student(*batch, targets=targets, labels=torch.tensor([3, 2, 1, 0]))
    assert not torch.allclose(a["kd_a2v"], c["kd_a2v"])
    for bad in (None, torch.tensor([0, 1, 2, -1]), torch.tensor([0, 1, 2, 4])):
        with pytest.raises(ValueError, match="oracle_targets needs labels"):
            student(*batch, targets=targets, labels=bad)


def test_kd_v2a_weight_zero_distils_audio_to_video_only(tiny, views) -> None:
    cfg = tiny(objective="mr_kd", kd_v2a_weight=0.0)
    student = XKD(cfg)
    batch = views(cfg, batch=4)
    targets = XKDTeacher(student)(*batch, temp_video=0.1, temp_audio=0.07)
    out = student(*batch, targets=targets)
    torch.testing.assert_close(out["kd"], out["kd_a2v"])
    out["kd"].backward()  # no video -> audio signal reaches the audio head
    assert all(p.grad is None or not p.grad.any() for p in student.head["audio"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.head["video"].parameters())


def test_forward_checks_views(tiny, views) -> None:
    cfg = tiny(variant="mas")
    student = XKD(cfg)
    vg, vl, ag, al = views(cfg)
    teacher = XKDTeacher(student)
    targets = teacher(vg, vl, ag, al, temp_video=0.1, temp_audio=0.1)
    with pytest.raises(ValueError, match=r"video_local must be \(L=3"):
        student(vg, vl[:1], ag, al, targets=targets)
    with pytest.raises(ValueError, match="audio_global is None"):
        student(vg, vl, None, al, targets=targets)
    with pytest.raises(ValueError, match="pass targets"):
        student(vg, vl, ag, al)
    # Reconstruction-only objectives ignore the local views.
    XKD(tiny(objective="mr"))(vg, None, ag, None)


def test_sdpa_and_explicit_models_agree(tiny, views) -> None:
    sdpa, explicit = XKD(tiny()), XKD(tiny(attention="explicit"))
    explicit.load_state_dict(sdpa.state_dict())
    batch = views(tiny())
    out_s = step_outputs(sdpa, XKDTeacher(sdpa), batch)
    out_e = step_outputs(explicit, XKDTeacher(explicit), batch)
    for k in ("recon_video", "recon_audio", "kd", "da", "loss"):
        torch.testing.assert_close(out_s[k], out_e[k], rtol=1e-4, atol=1e-5)


def smooth_views(cfg, batch: int) -> tuple[torch.Tensor, ...]:
    """Low-frequency random fields (learnable from neighbouring patches, unlike white noise); the local views are
    the same fields at the local sizes."""
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(batch, 3, 2, 4, 4, generator=g), torch.randn(batch, 1, 4, 4, generator=g)
    return (
        F.interpolate(video, size=(cfg.video_frames, cfg.video_size, cfg.video_size), mode="trilinear"),
        F.interpolate(
            video, size=(cfg.video_local_frames, cfg.video_local_size, cfg.video_local_size), mode="trilinear"
        )[None],
        F.interpolate(audio, size=(cfg.audio_mels, cfg.audio_frames), mode="bilinear"),
        F.interpolate(audio, size=(cfg.audio_mels, cfg.audio_local_frames), mode="bilinear")[None],
    )


def test_tiny_model_overfits_one_batch(tiny) -> None:
    torch.manual_seed(0)
    cfg = tiny()
    student = XKD(cfg)
    teacher = XKDTeacher(student)
    batch = smooth_views(cfg, batch=4)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    history = []
    for _ in range(60):
        out = step_outputs(student, teacher, batch, seed=0)  # fixed masks: one batch, one masking
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        teacher.update(student, momentum=0.99)
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    for k in ("loss", "recon_video", "recon_audio", "kd", "da_student"):
        assert last[k] < 0.8 * first[k], f"{k}: {first[k]:.3f} -> {last[k]:.3f}"


@pytest.mark.gpu
def test_bf16_cuda_step(tiny, views) -> None:
    cfg = tiny()
    student = XKD(cfg).cuda()
    teacher = XKDTeacher(student)
    batch = [v.cuda() for v in views(cfg)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        targets = teacher(*batch, temp_video=0.1, temp_audio=0.07)
        out = student(*batch, targets=targets)
    out["loss"].backward()
    assert targets.probs_video.dtype == targets.logits_audio.dtype == torch.float32
    assert all(torch.isfinite(v) for v in out.values())
    assert all(p.grad is not None for p in student.parameters())
    teacher.update(student, momentum=0.99)


def test_base_step_shapes_on_meta() -> None:
    # The paper's geometry end to end (MAS: 3 video local views), shapes only, on the meta device.
    cfg = ModelConfig.from_name("base", variant="mas")
    with torch.device("meta"):
        student = XKD(cfg)
        teacher = XKDTeacher(student)
        batch = (
            torch.empty(2, 3, 32, 112, 112),
            torch.empty(3, 2, 3, 8, 96, 96),
            torch.empty(2, 1, 80, 448),
            torch.empty(1, 2, 1, 80, 112),
        )
        targets = teacher(*batch, temp_video=0.09, temp_audio=0.04)
        out = student(*batch, targets=targets)
    assert targets.probs_video.shape == targets.logits_audio.shape == (2, 8192)
    assert targets.weights_video.shape == (2, 392) and targets.weights_audio.shape == (2, 560)
    assert all(v.shape == () for v in out.values())
    assert (
        student.decoder["video"].pred.out_features == 3072
        and student.decoder["audio"].pred.out_features == 64
    )
