"""Teacher engines: SGLang scorer and in-process forward behind one interface."""

from megatron_opd.teacher.base import TeacherEngine
from megatron_opd.teacher.config import TeacherConfig, build_teacher_engine
from megatron_opd.teacher.local import LocalTeacher
from megatron_opd.teacher.scoring import compute_response_scores
from megatron_opd.teacher.types import TeacherScore

__all__ = ["LocalTeacher", "TeacherConfig", "TeacherEngine", "TeacherScore", "build_teacher_engine",
           "compute_response_scores"]
