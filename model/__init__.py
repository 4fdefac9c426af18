"""XKD model (pure torch): configuration, ViT encoders, reconstruction decoders, projector heads, losses, the
student/teacher wiring and the FLOP count. See `docs/design.md` ("xkd.model API") for how the parts are used."""

from xkd.model.config import ModelConfig
from xkd.model.encoder import Encoder, build_encoder
from xkd.model.flops import flops_breakdown, flops_per_sample
from xkd.model.xkd import XKD, TeacherTargets, XKDTeacher

__all__ = [
    "XKD",
    "Encoder",
    "ModelConfig",
    "TeacherTargets",
    "XKDTeacher",
    "build_encoder",
    "flops_breakdown",
    "flops_per_sample",
]
