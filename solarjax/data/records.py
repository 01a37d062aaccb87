"""SFT and preference records -> token ids and loss masks, through the model's chat template.

Layouts, detected per record:
- SFT: `messages` ([{role, content}], system/user/assistant, any number of turns); Alpaca
  (`instruction`, optional `input`, `output`, optional `system`); OpenOrca (`question`,
  `response`, optional `system_prompt`); `prompt` / `completion` (each a string or a list of
  messages).
- Preference pairs: `prompt` (a string or messages; `question` is taken as its name too, with an
  optional `system`, as Intel/orca_dpo_pairs has them), `chosen` and `rejected` (strings, or lists
  of assistant messages; a list that starts with the prompt's messages, as UltraFeedback's do, has
  them dropped).

The mask marks the tokens the loss learns (mask[t] = 1: token t is a target). For SFT these are,
for every assistant message i, the ids that apply_chat_template(messages[:i+1]) adds beyond
apply_chat_template(messages[:i], add_generation_prompt=True): the reply and the template's
end-of-turn token, not the header that the generation prompt already wrote. For a pair, the
response is what the full conversation adds beyond apply_chat_template(prompt,
add_generation_prompt=True). A template for which one is not a prefix of the other (a template
that rewrites earlier turns, or a tokenizer that merges across the boundary) is refused: the
mask would be a guess.
"""

from __future__ import annotations

from solarjax.errors import SolarjaxError
from solarjax.tokenizer import Tokenizer

# map statuses, counted in the token cache's meta.json
OK, EMPTY, NO_TARGET = 0, 1, 2


class RecordError(SolarjaxError):
    """A record does not have a known layout or cannot be rendered; the message names it."""


def _messages(value, role: str, where: str) -> list[dict]:
    """A string becomes one message of `role`; a list must already be messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise RecordError(f"{where}: expected a string or a list of {{role, content}} messages, got {value!r:.200}")


def sft_messages(record: dict, where: str) -> list[dict]:
    if record.get("messages") is not None:
        return _messages(record["messages"], "user", f"{where} messages")
    if record.get("instruction") is not None and record.get("output") is not None:
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return system + [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if record.get("question") is not None and record.get("response") is not None:  # OpenOrca's columns
        system = record.get("system_prompt") or record.get("system")
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["response"]}]
    if record.get("prompt") is not None and record.get("completion") is not None:
        return (_messages(record["prompt"], "user", f"{where} prompt")
                + _messages(record["completion"], "assistant", f"{where} completion"))
    keys = sorted(k for k, v in record.items() if v is not None)
    raise RecordError(f"{where}: not an SFT record: expected `messages`, `instruction` + `output` (Alpaca), "
                      f"`question` + `response` (OpenOrca) or `prompt` + `completion`; it has {keys}")


def _render(tokenizer: Tokenizer, messages: list[dict], where: str, add_generation_prompt: bool = False) -> list[int]:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's own raise_exception, or a jinja error
        raise RecordError(f"{where}: the chat template cannot render it ({type(e).__name__}: {e})") from None


def _extends(longer: list[int], prefix: list[int], tokenizer: Tokenizer, where: str, what: str) -> None:
    if longer[:len(prefix)] != prefix:
        at = next((i for i, (a, b) in enumerate(zip(longer, prefix)) if a != b), min(len(longer), len(prefix)))
        raise RecordError(
            f"{where}: the chat template's rendering of {what} does not extend the rendering before it "
            f"(they differ at token {at}: {tokenizer.decode(prefix[at:at + 8])!r} vs "
            f"{tokenizer.decode(longer[at:at + 8])!r}), so the tokens to learn are not defined; this "
            f"template rewrites earlier turns or its tokens merge across the boundary (set data.chat_template)")


def sft_example(tokenizer: Tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """(ids of the whole conversation, mask: 1 on every assistant message's tokens)."""
    ids = _render(tokenizer, messages, where)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        upto = _render(tokenizer, messages[:i + 1], where)
        _extends(upto, before, tokenizer, where, f"assistant message {i}")
        _extends(ids, upto, tokenizer, where, f"the conversation after message {i}")
        mask[len(before):len(upto)] = [1] * (len(upto) - len(before))
    return ids, mask


def preference_pair(tokenizer: Tokenizer, record: dict, where: str):
    """((chosen ids, mask), (rejected ids, mask)): the mask marks each response's tokens."""
    prompt = record.get("prompt", record.get("question"))
    if prompt is None or record.get("chosen") is None or record.get("rejected") is None:
        keys = sorted(k for k, v in record.items() if v is not None)
        raise RecordError(f"{where}: not a preference record: expected `prompt` (or `question`), `chosen` and "
                          f"`rejected`; it has {keys}")
    prompt = _messages(prompt, "user", f"{where} prompt")
    if record.get("system") and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": record["system"]}] + prompt
    head = _render(tokenizer, prompt, where, add_generation_prompt=True)
    out = []
    for key in ("chosen", "rejected"):
        response = _messages(record[key], "assistant", f"{where} {key}")
        if response[:len(prompt)] == prompt:  # the whole conversation, as UltraFeedback stores it
            response = response[len(prompt):]
        ids = _render(tokenizer, prompt + response, where)
        _extends(ids, head, tokenizer, where, f"the {key} conversation")
        out.append((ids, [0] * len(head) + [1] * (len(ids) - len(head))))
    return tuple(out)


class Render:
    """The datasets.map function over a batch of records: picklable, so workers load the tokenizer
    from its files. sft: one row per record; pairs: two rows per record, chosen then rejected."""

    def __init__(self, layout: str, tokenizer: Tokenizer, source: str):
        self.layout, self.tokenizer, self.source = layout, tokenizer, source

    def __call__(self, batch, indices):
        out = {"ids": [], "mask": [], "status": []}
        columns = list(batch)
        for j, index in enumerate(indices):
            record = {k: batch[k][j] for k in columns}
            where = f"{self.source} record {index}"
            if self.layout == "sft":
                rows = [sft_example(self.tokenizer, sft_messages(record, where), where)]
            else:
                rows = preference_pair(self.tokenizer, record, where)
            status = OK if all(any(mask) for _, mask in rows) else NO_TARGET
            for ids, mask in rows:
                out["ids"].append(ids), out["mask"].append(mask), out["status"].append(status)
        return out
