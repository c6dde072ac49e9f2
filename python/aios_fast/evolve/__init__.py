"""The loop that makes a node learn by itself: the trigger, teachers, grounding, the
distillers and the node object ArrowEngine delegates to.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "LearningRequest": ".jobs",
    "Learner": ".jobs",
    "CognitiveTrigger": ".trigger",
    "Decision": ".trigger",
    "SkillNode": ".node",
    "OpenAICompatibleProvider": ".teachers",
    "LocalTeacher": ".teachers",
    "Teacher": ".teachers",
    "TeacherReply": ".teachers",
    "TeacherBudget": ".teachers",
    "TeacherError": ".teachers",
    "BudgetExceeded": ".teachers",
    "LlamaServer": ".llama_server",
    "parse_qa_pairs": ".parsing",
    "DocumentIndex": ".retrieval",
    "Passage": ".retrieval",
    "CloudDistiller": ".distiller",
    "SkillDistiller": ".distiller",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
