"""XKD wiring: the students with their reconstruction decoders (`XKD`) and the EMA teachers (`XKDTeacher`)
(method sheet sections 1.5, 1.6, 2.1-2.8 and decisions 1, 5, 6, 7).

One step (train.py): `targets = teacher(...)` under no-grad (refined, centered and sharpened teacher outputs; the
centers are updated after the targets are formed), then `out = student(..., targets=targets)`, backward, optimizer
step, `teacher.update(student, m)`.

Variants are configuration: `variant="mas"` hands one student block stack to both modality encoders; `"mats"` also
gives both teachers one shared block stack, which `update` moves exactly once per step (the release moved it twice).
Each objective builds only what it uses (decision 7):

| objective | students + decoders | heads | teachers | loss |
|---|---|---|---|---|
| mr_video | video | - | - | L_recon^v |
| mr | video, audio | - | - | L_recon |
| mr_kd | video, audio | yes | yes | (L_kd + 5 L_recon) / 6 |
| mr_da | video, audio | yes | - | (L_da + 5 L_recon) / 6 |
| full | video, audio | yes | yes | (L_da + L_kd + 5 L_recon) / 7 |

L_da is the release's (MMD(students) + MMD(teachers)) / 2, whose teacher half carries no gradient; `mr_da` has no
teacher, so there L_da is MMD(students) alone and its DA gradient is twice that of `full` at equal coefficients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xkd.model.config import MODALITIES, Modality, ModelConfig
from xkd.model.decoder import Decoder
from xkd.model.encoder import Encoder, build_encoder
from xkd.model.heads import ProjectorHead, mean_patch_tokens, refined_pool, refinement_weights
from xkd.model.layers import build_blocks, patchify
from xkd.model.losses import (
    kd_diagnostics,
    kd_loss,
    mmd,
    output_spread,
    reconstruction_loss,
    teacher_probs,
    update_center,
)


@dataclass
class TeacherTargets:
    """What the teachers hand to the students for one step (all float32, no grad)."""

    probs_video: Tensor
    """(B, K) softmax((t_v - c_v) / tau_v): video teacher targets for the audio student (v2a)."""
    probs_audio: Tensor
    """(B, K) softmax((t_a - c_a) / tau_a): audio teacher targets for the video student (a2v)."""
    logits_video: Tensor
    """(B, K) raw video teacher head outputs (teacher-pair MMD, diagnostics)."""
    logits_audio: Tensor
    """(B, K) raw audio teacher head outputs."""
    weights_video: Tensor | None
    """(B, N_v) refinement weights of the video teacher's patch tokens; None without refinement."""
    weights_audio: Tensor | None
    """(B, N_a) refinement weights of the audio teacher's patch tokens; None without refinement."""


def build_head(cfg: ModelConfig) -> ProjectorHead:
    """A projector head for `cfg` (one per modality and network)."""
    return ProjectorHead(
        cfg.embed_dim, cfg.head_hidden_dim, cfg.head_layers, cfg.head_bottleneck_dim, cfg.head_out_dim
    )


class XKD(nn.Module):
    """The students (encoders, heads) and the reconstruction decoders; only the modules `cfg` uses are built."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        fused = cfg.attention == "sdpa"
        shared = None
        if cfg.variant in ("mas", "mats"):
            shared = build_blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, fused)
        self.encoder = nn.ModuleDict({m: build_encoder(cfg, m, shared) for m in cfg.modalities})
        self.decoder = nn.ModuleDict(
            {
                m: Decoder(
                    cfg.embed_dim,
                    cfg.decoder_dim,
                    cfg.decoder_depth,
                    cfg.decoder_heads,
                    cfg.mlp_ratio,
                    cfg.qkv_bias,
                    fused,
                    num_tokens=cfg.video_tokens if m == "video" else cfg.audio_tokens,
                    patch_dim=self.encoder[m].patch_embed.proj.in_features,
                )
                for m in cfg.modalities
            }
        )
        self.head = nn.ModuleDict({m: build_head(cfg) for m in cfg.modalities} if cfg.uses_heads else {})

    def encoders(self) -> dict[str, Encoder]:
        """{"video": Encoder, "audio": Encoder} for the modalities built."""
        return dict(self.encoder.items())

    def heads(self) -> dict[str, ProjectorHead]:
        """{"video": head, "audio": head} when the objective uses heads, else {}."""
        return dict(self.head.items())

    def forward(
        self,
        video_global: Tensor,
        video_local: Tensor | None,
        audio_global: Tensor | None,
        audio_local: Tensor | None,
        targets: TeacherTargets | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One training step's losses.

        Args:
            video_global: (B, C, T, H, W) global video view.
            video_local: (L, B, C, T_l, H_l, W_l) local video views, or None when the objective uses none.
            audio_global: (B, 1, F, T_mel) global audio view (None for `mr_video`).
            audio_local: (L', B, 1, F, T_mel_l) local audio views, or None when the objective uses none.
            targets: the teacher's output for the same batch (KD objectives).
            labels: (B,) class ids, only for `cfg.oracle_targets`.

        Returns:
            "loss" and the terms the objective uses ("recon_video", "recon_audio", "recon", "kd_a2v", "kd_v2a",
            "kd", "da", "da_student", "da_teacher") as scalars, plus detached "diag/..." health signals.
        """
        views = {"video": (video_global, video_local), "audio": (audio_global, audio_local)}
        out, logits = {}, {}
        for m in self.cfg.modalities:
            global_view, local_views = self._views(m, *views[m])
            # Mask and encode the global view, decode every patch, reconstruct the masked ones.
            latent, mask, ids_restore = self.encoder[m].forward_masked(global_view, self.cfg.mask_ratio(m))
            pred = self.decoder[m](latent, ids_restore)
            target = patchify(global_view, self.cfg.patch(m))
            out[f"recon_{m}"] = reconstruction_loss(pred, target, mask, self.cfg.norm_pix_loss)
            if self.cfg.uses_heads:  # student embeddings: masked global latent + unmasked local views
                logits[m] = self.student_logits(m, latent, local_views)
        out["recon"] = sum(out[f"recon_{m}"] for m in self.cfg.modalities) / len(self.cfg.modalities)
        if self.cfg.uses_kd:  # distil across modalities
            out |= self.distill(logits, targets, labels)
        if self.cfg.uses_da:  # align the two students' output distributions
            out |= self.align(logits, targets)
        out["loss"] = self.combine(out)
        return out

    def _views(
        self, m: Modality, global_view: Tensor | None, local_views: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Check the views of modality `m` against the config; locals are returned only when the heads use them."""
        if global_view is None:
            raise ValueError(
                f"XKD.forward: {m}_global is None, but objective={self.cfg.objective!r} uses {m}"
            )
        num_local = self.cfg.local_views(m)
        if not self.cfg.uses_heads or num_local == 0:
            return global_view, None
        if (
            local_views is None
            or local_views.shape[0] != num_local
            or local_views.shape[1] != global_view.shape[0]
        ):
            got = None if local_views is None else tuple(local_views.shape)
            raise ValueError(
                f"XKD.forward: {m}_local must be (L={num_local}, B={global_view.shape[0]}, ...) as "
                f"ModelConfig.{m}_local_views says, got {got}"
            )
        return global_view, local_views

    def student_logits(self, m: Modality, latent: Tensor, local_views: Tensor | None) -> Tensor:
        """Student head outputs of all views of `m`, stacked [global; local_1; ...; local_L]: ((1 + L) B, K).

        The global embedding is the mean of the visible tokens of the masked pass (`latent`, CLS dropped); the
        local views run unmasked, batched together (method sheet 2.3).
        """
        pooled = [mean_patch_tokens(latent)]
        if local_views is not None:
            pooled.append(self.encoder[m].forward_features(local_views.flatten(0, 1)))  # (L B, D)
        return self.head[m](torch.cat(pooled))

    def distill(
        self, logits: dict[str, Tensor], targets: TeacherTargets | None, labels: Tensor | None
    ) -> dict[str, Tensor]:
        """Cross-modal KD in both directions (method sheet 2.5, `kd_v2a_weight` 1) with its diagnostics."""
        if targets is None:
            raise ValueError(
                f"XKD.forward: objective={self.cfg.objective!r} distils: pass targets=teacher(...)"
            )
        q_a2v = self.oracle(labels) if self.cfg.oracle_targets else targets.probs_audio
        tau = self.cfg.student_temp
        out = {
            "kd_a2v": kd_loss(logits["video"], q_a2v, tau),
            "kd_v2a": kd_loss(logits["audio"], targets.probs_video, tau),
        }
        w = self.cfg.kd_v2a_weight
        out["kd"] = (out["kd_a2v"] + w * out["kd_v2a"]) / (1 + w)
        out |= kd_diagnostics(logits["video"], q_a2v, targets.logits_audio, "a2v")
        out |= kd_diagnostics(logits["audio"], targets.probs_video, targets.logits_video, "v2a")
        return out

    def oracle(self, labels: Tensor | None) -> Tensor:
        """One-hot labels over the first `oracle_num_classes` prototypes: (B,) -> (B, K) float32."""
        n = self.cfg.oracle_num_classes
        # A host sync per step, acceptable for a control experiment; a bad label must not train silently.
        if labels is None or labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= n:
            raise ValueError(
                f"XKD.forward: oracle_targets needs labels in [0, {n}) for every sample, got {labels}"
            )
        return F.one_hot(labels, self.cfg.head_out_dim).float()

    def align(self, logits: dict[str, Tensor], targets: TeacherTargets | None) -> dict[str, Tensor]:
        """Domain alignment: MMD between the students' head outputs (method sheet 2.6); with teachers, the
        release's average with the gradient-free teacher-pair MMD."""
        gammas = self.cfg.mmd_gammas
        mmd_students = mmd(logits["video"], logits["audio"], gammas)
        if targets is None:
            return {"da": mmd_students}
        mmd_teachers = mmd(targets.logits_video, targets.logits_audio, gammas).detach()
        return {
            "da": (mmd_students + mmd_teachers) / 2,
            "da_student": mmd_students.detach(),
            "da_teacher": mmd_teachers,
        }

    def combine(self, out: dict[str, Tensor]) -> Tensor:
        """(sum of coeff * term) / (sum of the coefficients used) over the objective's terms (method sheet 2.7)."""
        terms = [(self.cfg.recon_coeff, out["recon"])]
        if self.cfg.uses_kd:
            terms.append((self.cfg.kd_coeff, out["kd"]))
        if self.cfg.uses_da:
            terms.append((self.cfg.da_coeff, out["da"]))
        return sum(c * t for c, t in terms) / sum(c for c, _ in terms)


class XKDTeacher(nn.Module):
    """EMA teachers (encoders + heads, no decoders) and the DINO centers, built as copies of `student`.

    `variant="mats"`: both teacher encoders share one block stack (copied once from the shared student blocks);
    `"mas"`: each modality gets its own copy of the shared student blocks, both then following that one stack.
    """

    def __init__(self, student: XKD) -> None:
        super().__init__()
        cfg = student.cfg
        if not cfg.uses_teacher:
            raise ValueError(
                f"XKDTeacher: objective={cfg.objective!r} uses no teacher (only 'mr_kd' and 'full' do)"
            )
        self.cfg = cfg
        if cfg.variant == "mats":
            # One deepcopy of the ModuleDict: its memo keeps the shared block stack shared in the copy.
            self.encoder = copy.deepcopy(student.encoder)
        else:
            self.encoder = nn.ModuleDict({m: copy.deepcopy(student.encoder[m]) for m in cfg.modalities})
        self.head = copy.deepcopy(student.head)
        self.requires_grad_(False)
        # DINO centers, one per direction: of the video teacher's outputs (video -> audio student) and of the
        # audio teacher's outputs (audio -> video student).
        self.register_buffer("center_video", torch.zeros(1, cfg.head_out_dim))
        self.register_buffer("center_audio", torch.zeros(1, cfg.head_out_dim))
        if cfg.teacher_temp_relative:
            # Each teacher's output spread at the first step (0 until then), the reference of its temperature.
            self.register_buffer("spread0_video", torch.zeros(()))
            self.register_buffer("spread0_audio", torch.zeros(()))

    def encoders(self) -> dict[str, Encoder]:
        """{"video": Encoder, "audio": Encoder}."""
        return dict(self.encoder.items())

    @torch.no_grad()
    def forward(
        self,
        video_global: Tensor,
        video_local: Tensor | None,
        audio_global: Tensor,
        audio_local: Tensor | None,
        temp_video: float,
        temp_audio: float,
    ) -> TeacherTargets:
        """Refined, centered and sharpened targets for this batch; then the centers move (DINO ordering).

        The teachers see the unmasked global views (`teacher_input="global"`) or local view 0 of each modality
        (`"local"`, the release). Views as in `XKD.forward`; temperatures are the scheduled current values.
        """
        cfg = self.cfg
        if cfg.teacher_input == "global":
            inputs = {"video": video_global, "audio": audio_global}
        else:
            if video_local is None or audio_local is None:
                raise ValueError(
                    "XKDTeacher.forward: teacher_input='local' needs video_local and audio_local"
                )
            inputs = {"video": video_local[0], "audio": audio_local[0]}
        weights = {"video": None, "audio": None}
        if cfg.refine:
            (tokens_v, attn_v), (tokens_a, attn_a) = (
                self.encoder[m].forward_with_attention(inputs[m]) for m in MODALITIES
            )
            weights["video"], weights["audio"] = refinement_weights(attn_v, attn_a, cfg.refine_mode)
            pooled = {
                "video": refined_pool(tokens_v, weights["video"]),
                "audio": refined_pool(tokens_a, weights["audio"]),
            }
        else:
            pooled = {m: mean_patch_tokens(self.encoder[m](inputs[m])) for m in MODALITIES}
        logits = {m: self.head[m](pooled[m]).float() for m in MODALITIES}
        temps = {"video": temp_video, "audio": temp_audio}
        if cfg.teacher_temp_relative:
            temps = {m: temps[m] * self.spread_ratio(m, logits[m]) for m in MODALITIES}
        targets = TeacherTargets(
            probs_video=teacher_probs(logits["video"], self.center_video, temps["video"]),
            probs_audio=teacher_probs(logits["audio"], self.center_audio, temps["audio"]),
            logits_video=logits["video"],
            logits_audio=logits["audio"],
            weights_video=weights["video"],
            weights_audio=weights["audio"],
        )
        update_center(self.center_video, logits["video"], cfg.center_momentum)
        update_center(self.center_audio, logits["audio"], cfg.center_momentum)
        return targets

    def spread_ratio(self, modality: str, logits: Tensor) -> Tensor:
        """This batch's output spread of a teacher over its first step's (`teacher_temp_relative`); sets the
        reference on the first call. A () tensor: no host sync."""
        spread, spread0 = output_spread(logits), getattr(self, f"spread0_{modality}")
        spread0.copy_(torch.where(spread0 > 0, spread0, spread))
        # The floor only guards the division: a head whose outputs are all equal gives every clip the same target
        # either way.
        return spread.clamp_min(1e-12) / spread0.clamp_min(1e-12)

    @torch.no_grad()
    def update(self, student: XKD, momentum: float) -> None:
        """EMA step theta_t <- m theta_t + (1 - m) theta_s over every teacher parameter, each distinct parameter
        exactly once (a block stack shared by both teachers in MATS is moved once, decision 5).

        `student` is the unwrapped `XKD` (accelerator.unwrap_model), not a DDP wrapper.
        """
        if not isinstance(student, XKD):
            raise TypeError(
                f"XKDTeacher.update: expected the unwrapped XKD student, got {type(student).__name__}"
            )
        teacher_params, student_params, seen = [], [], set()
        for part in ("encoder", "head"):
            for m in self.cfg.modalities:
                source = dict(getattr(student, part)[m].named_parameters())
                for name, param in getattr(self, part)[m].named_parameters():
                    if id(param) in seen:
                        continue
                    if name not in source or source[name].shape != param.shape:
                        raise ValueError(
                            f"XKDTeacher.update: student has no {part}.{m}.{name} of shape {tuple(param.shape)}"
                        )
                    seen.add(id(param))
                    teacher_params.append(param)
                    student_params.append(source[name].detach())
        # mul then add (not lerp) so that momentum 1 keeps and momentum 0 copies bit for bit.
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
