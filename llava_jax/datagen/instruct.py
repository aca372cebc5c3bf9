"""Instruction-data generation core: contexts -> prompts -> backend -> parsed LLaVA records.

The backend is any callable `messages -> Reply | str` (the HTTP `ChatClient`, or a deterministic
offline function such as `offline_backend` below), so synthetic data goes through the same path as
real data. Progress is an append-only JSONL next to the output (`FILE.json` -> `FILE.jsonl`): one
line per finished (image id, kind); a restart skips the pairs that already have an "ok" line and
retries the rest. The final JSON is rebuilt from the JSONL (first "ok" line per pair wins).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import random
import re
from pathlib import Path

from tqdm import tqdm

from .client import Reply, RequestError
from .context import ImageContext, parse_context
from .prompts import DETAIL_INSTRUCTIONS, KINDS, build_messages, kind_of_messages


class ParseError(ValueError):
    pass


# "Question:" / "Answer:" at a line start, tolerating markdown decoration such as "**Question:**".
_TURN = re.compile(r"^[ \t>*#_-]*(question|answer)[ \t]*[*_]*[ \t]*:[*_]*[ \t]*", re.IGNORECASE | re.MULTILINE)
_SEPARATOR_LINES = re.compile(r"^\s*(?:={3,}|-{3,}|\*{3,})\s*$", re.MULTILINE)


def parse_qa_pairs(text: str) -> list[tuple[str, str]]:
    """'Question: ..' / 'Answer: ..' blocks -> [(q, a), ...]. Text before the first label is ignored."""
    text = _SEPARATOR_LINES.sub("", text)
    marks = list(_TURN.finditer(text))
    if not marks:
        raise ParseError("no 'Question:' / 'Answer:' lines found")
    turns = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        content = text[m.end():end].strip()
        if not content:
            raise ParseError(f"empty {m.group(1)} at turn {i + 1}")
        turns.append((m.group(1).lower(), content))
    labels = [label for label, _ in turns]
    expected = ["question", "answer"] * (len(turns) // 2)
    if len(turns) % 2 or labels != expected:
        raise ParseError(f"turns must alternate Question/Answer starting with a question; got {labels}")
    return [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]


def parse_reply(kind: str, text: str):
    """conversation -> [(q, a), ...]; complex -> (q, a) (the first pair); detail -> str."""
    if kind == "conversation":
        return parse_qa_pairs(text)
    if kind == "complex":
        return parse_qa_pairs(text)[0]
    if kind == "detail":
        description = re.sub(r"^\s*\**description\**\s*:\**\s*", "", text.strip(), flags=re.IGNORECASE).strip()
        if not description:
            raise ParseError("empty description")
        return description
    raise ValueError(f"unknown instruction kind {kind!r}; expected one of {KINDS}")


def detail_instruction(image_id, seed: int = 0) -> str:
    """The detailed-description instruction of an image: fixed per (seed, image) so resumes agree."""
    return random.Random(f"{seed}:{image_id}").choice(DETAIL_INSTRUCTIONS)


def to_record(ctx: ImageContext, kind: str, parsed, image_prefix: str = "", seed: int = 0) -> dict:
    """A LLaVA instruction record; the image marker leads the first human turn ("<image>\\n...")."""
    if kind == "conversation":
        turns = []
        for i, (q, a) in enumerate(parsed):
            turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q})
            turns.append({"from": "gpt", "value": a})
    elif kind == "complex":
        q, a = parsed
        turns = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]
    elif kind == "detail":
        turns = [{"from": "human", "value": "<image>\n" + detail_instruction(ctx.image_id, seed)},
                 {"from": "gpt", "value": parsed}]
    else:
        raise ValueError(f"unknown instruction kind {kind!r}")
    return {"id": f"{Path(ctx.file_name).stem}_{kind}", "image": image_prefix + ctx.file_name,
            "conversations": turns}


@dataclasses.dataclass
class Summary:
    total: int = 0              # (image, kind) pairs asked for
    already_done: int = 0       # found finished in the progress file
    generated: int = 0          # finished in this run
    unparsable: int = 0         # skipped after all parse attempts
    request_failures: int = 0   # skipped after the client ran out of retries
    parse_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    records_written: int = 0

    def format(self) -> str:
        return (f"pairs: {self.total} (already done {self.already_done}, generated {self.generated}, "
                f"unparsable {self.unparsable}, request failures {self.request_failures}; "
                f"parse retries {self.parse_retries})\n"
                f"tokens this run: prompt {self.prompt_tokens}, completion {self.completion_tokens}, "
                f"total {self.prompt_tokens + self.completion_tokens}\n"
                f"records written: {self.records_written}")


def progress_path(out_path) -> Path:
    return Path(out_path).with_suffix(".jsonl")


def _open_progress(path: Path):
    """Read finished lines; cut a torn last line (a kill mid-write) so appends start clean."""
    lines = []
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open(path, "r+b") as f:
                f.truncate(len(data))
        for n, raw in enumerate(data.splitlines(), 1):
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                raise ValueError(f"progress file {path} line {n} is not JSON; fix or delete it") from None
    return lines


def _work(task, backend, parse_attempts: int, image_prefix: str, seed: int) -> dict:
    ctx, kind = task
    messages = build_messages(kind, ctx.text())
    line = {"image_id": ctx.image_id, "kind": kind, "prompt_tokens": 0, "completion_tokens": 0, "attempts": 0}
    for _ in range(parse_attempts):
        try:
            reply = backend(messages)
        except RequestError as e:
            if e.fatal:  # a bad key or model name fails every request: stop the run
                raise
            return {**line, "status": "request_failed", "error": str(e)}
        if isinstance(reply, str):
            reply = Reply(reply)
        line["attempts"] += 1
        line["prompt_tokens"] += reply.prompt_tokens
        line["completion_tokens"] += reply.completion_tokens
        try:
            parsed = parse_reply(kind, reply.text)
        except ParseError as e:
            line.update(status="unparsable", error=str(e), reply=reply.text[:2000])
            continue
        kept = {k: v for k, v in line.items() if k not in ("error", "reply")}  # from failed attempts
        return {**kept, "status": "ok", "record": to_record(ctx, kind, parsed, image_prefix, seed)}
    return line


def generate(contexts: list[ImageContext], kinds, backend, out_path, *, concurrency: int = 4,
             parse_attempts: int = 3, image_prefix: str = "", seed: int = 0, progress: bool = True) -> Summary:
    """Generate (or finish generating) instruction data for every (context, kind); write out_path."""
    kinds = list(kinds)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown instruction kind {k!r}; expected some of {KINDS}")
    out_path, jsonl = Path(out_path), progress_path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    finished = {(ln["image_id"], ln["kind"]) for ln in _open_progress(jsonl) if ln.get("status") == "ok"}
    tasks = [(ctx, k) for ctx in contexts for k in kinds]
    todo = [t for t in tasks if (t[0].image_id, t[1]) not in finished]
    summary = Summary(total=len(tasks), already_done=len(tasks) - len(todo))

    with open(jsonl, "a") as log, cf.ThreadPoolExecutor(max(1, concurrency)) as pool, \
            tqdm(total=len(tasks), initial=summary.already_done, disable=not progress, desc="datagen") as bar:
        queue, pending = iter(todo), set()

        def fill():  # a bounded window keeps memory flat on 100k-image runs
            for task in queue:
                pending.add(pool.submit(_work, task, backend, parse_attempts, image_prefix, seed))
                if len(pending) >= 2 * max(1, concurrency):
                    return

        fill()
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                pending.discard(future)
                line = future.result()
                log.write(json.dumps(line) + "\n")
                log.flush()
                summary.prompt_tokens += line["prompt_tokens"]
                summary.completion_tokens += line["completion_tokens"]
                summary.parse_retries += max(0, line.get("attempts", 0) - 1)
                status = line["status"]
                if status == "ok":
                    summary.generated += 1
                elif status == "unparsable":
                    summary.unparsable += 1
                else:
                    summary.request_failures += 1
                bar.update(1)
            fill()

    summary.records_written = write_final_json(jsonl, out_path)
    return summary


def write_final_json(jsonl, out_path) -> int:
    """Rebuild the output JSON from the progress file: one record per (image, kind), sorted."""
    order = {k: i for i, k in enumerate(KINDS)}
    records = {}
    for line in _open_progress(Path(jsonl)):
        if line.get("status") == "ok":
            records.setdefault((line["image_id"], line["kind"]), line["record"])
    ordered = [records[key] for key in sorted(records, key=lambda k: (str(k[0]).zfill(20), order[k[1]]))]
    tmp = Path(str(out_path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(ordered, f, indent=1)
    os.replace(tmp, out_path)
    return len(ordered)


# --- a deterministic offline backend -------------------------------------------------------------

def _where(box) -> str:
    cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    return "in the center" if (horizontal, vertical) == ("center", "middle") else f"at the {vertical} {horizontal}"


def _counts(boxes) -> str:
    counts = {}
    for b in boxes:
        counts[b.category] = counts.get(b.category, 0) + 1
    return ", ".join(f"{n} {cat}" + ("s" if n > 1 else "") for cat, n in counts.items())


def offline_backend(messages: list[dict]) -> str:
    """Writes a well-formed reply from the context alone (no model): captions and box positions.

    Deterministic, so the quickstart and tests build instruction data through the real code path.
    """
    kind = kind_of_messages(messages)
    captions, boxes = parse_context(messages[-1]["content"])
    first = captions[0] if captions else "A picture."
    if kind == "detail":
        text = " ".join(captions) or first
        if boxes:
            text += " " + " ".join(f"There is a {b.category} {_where(b)}." for b in boxes)
        return text
    if kind == "complex":
        if boxes:
            b = boxes[0]
            return (f"Question: Where is the {b.category} and what does the scene show?\n"
                    f"Answer: The {b.category} is {_where(b)} of the picture. {first}")
        return f"Question: What does the scene show?\nAnswer: {first}"
    pairs = [("What is shown in the image?", first)]
    if boxes:
        pairs.append(("Which objects can you see?", f"I can see {_counts(boxes)}."))
        pairs += [(f"Where is the {b.category}?", f"The {b.category} is {_where(b)}.") for b in boxes[:2]]
    return "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs)
