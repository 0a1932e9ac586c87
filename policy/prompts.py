"""Chat formatting of solution prompts and the step-level self-evaluation prompt.

A solution prompt is: the chat template over the task's few-shot turns and the user turn, the
assistant generation prompt, then the steps so far, each followed by the step separator. The policy
continues it with the next step. Prompts of siblings and descendants share this prefix exactly, so
the prefix cache serves them.

The self-evaluation prompt asks the policy whether a partial solution is on the right track and ends
with an assistant prefix after which the next token is the choice ("A" = correct, "B" = wrong), as
in the MCTS-DPO reference implementation's evaluation prompt (yuxixie/MCTS-DPO).
"""

from __future__ import annotations

from dataclasses import dataclass

from mcts.types import Problem


@dataclass(frozen=True)
class PromptConfig:
    """The `prompt` config group.

    system: a system message; null = the model's chat template default.
    step_separator: what ends a step (and the stop string for step sampling).
    eval_template: the self-evaluation user turn; fields {question}, {reference}, {steps}.
    eval_reference: how the gold answer is shown when allowed ({answer}); "" when not shown.
    eval_prefix: the assistant's opening after which the next token is the choice.
    eval_choices: (correct, wrong) choice strings; the score is p(correct) / (p(correct) + p(wrong)).
    """

    system: str | None = None
    step_separator: str = "\n"
    eval_template: str = (
        "Is every step of this partial solution correct? Answer (A) correct or (B) wrong.\n"
        "Question: {question}\n{reference}Partial solution:\n{steps}"
    )
    eval_reference: str = "Reference answer: {answer}\n"
    eval_prefix: str = "The partial solution is ("
    eval_choices: tuple[str, str] = ("A", "B")


class PromptFormatter:
    """Formats prompts with a model's chat template (holds the tokenizer)."""

    def __init__(self, tokenizer, task, cfg: PromptConfig):
        self.tokenizer = tokenizer
        self.task = task
        self.cfg = cfg
        self._head_cache: dict[str, str] = {}

    def _chat(self, messages: list[dict[str, str]]) -> str:
        if self.cfg.system is not None:
            messages = [{"role": "system", "content": self.cfg.system}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def question_prompt(self, problem: Problem) -> str:
        """The chat-formatted prompt up to the start of the assistant's solution."""
        if problem.id not in self._head_cache:
            messages = []
            for example in self.task.few_shot:
                messages.append({"role": "user",
                                 "content": self.task.user_message(Problem("shot", example.question, ""))})
                messages.append({"role": "assistant", "content": example.solution})
            messages.append({"role": "user", "content": self.task.user_message(problem)})
            if len(self._head_cache) > 100_000:  # bound memory on very long runs
                self._head_cache.clear()
            self._head_cache[problem.id] = self._chat(messages)
        return self._head_cache[problem.id]

    def solution_prompt(self, problem: Problem, steps: tuple[str, ...]) -> str:
        sep = self.cfg.step_separator
        return self.question_prompt(problem) + "".join(step + sep for step in steps)

    def value_prompt(self, problem: Problem, steps: tuple[str, ...]) -> str:
        """What the learned value model reads (policy/value_model.py): the question and the steps so far
        in the chat format, without the task's worked examples, which every text would repeat (a
        transformers forward has no prefix cache) and which say nothing about this partial solution."""
        sep = self.cfg.step_separator
        head = self._chat([{"role": "user", "content": self.task.user_message(problem)}])
        return head + "".join(step + sep for step in steps)

    def eval_prompt(self, problem: Problem, steps: tuple[str, ...], *, with_reference: bool) -> str:
        reference = self.cfg.eval_reference.format(answer=problem.answer) if with_reference else ""
        body = self.cfg.eval_template.format(
            question=problem.question, reference=reference, steps="\n".join(steps) if steps else "(no steps yet)"
        )
        return self._chat([{"role": "user", "content": body}]) + self.cfg.eval_prefix
