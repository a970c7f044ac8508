"""Chat formats of the supported families, kept as data: special tokens, turn wrappers, image placeholder.

One `ChatFormat` per family drives three things that must agree: the Jinja chat template saved with the tokenizer
(users call `apply_chat_template`), the segment rendering the collator uses to mask everything but assistant
tokens, and the prompt a device renders before generation. Torch-free.

    >>> fmt = CHAT_FORMATS["qwen2vl"]
    >>> "".join(text for text, _ in fmt.segments([("user", "Hi?"), ("assistant", "red")], has_image=True))
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatFormat:
    family: str
    bos: str                      # prepended once ("" when the family has none in its prompts)
    user: str                     # "{image}" and "{text}" slots
    assistant_prefix: str         # opens the model's turn (what add_generation_prompt appends)
    assistant_end: str            # closes the model's turn; trained, it is the stop token
    after_assistant: str          # template text after the end token (not trained)
    image: str                    # what "{image}" becomes when the turn carries the image
    system: str | None = None     # "{text}" slot; None: the family has no system turn
    default_system: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # name -> token, named on the tokenizer
    extra_tokens: tuple[str, ...] = ()                            # other specials the processor needs
    pad: str = "<|pad|>"

    @property
    def eos(self) -> str:
        return self.assistant_end

    def all_special_tokens(self) -> list[str]:
        seen: dict[str, None] = {}
        for tok in [self.bos, self.pad, self.assistant_end, *self.special_tokens.values(), *self.extra_tokens]:
            if tok:
                seen[tok] = None
        return list(seen)

    def segments(self, turns, has_image: bool, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """Render (role, text) turns into (text, trainable) pieces; the image goes into the first user turn."""
        out: list[tuple[str, bool]] = []
        head = self.bos
        roles = [r for r, _ in turns]
        if self.system is not None and "system" not in roles and self.default_system:
            head += self.system.format(text=self.default_system)
        image_pending = has_image
        for role, text in turns:
            if role == "system":
                if self.system is None:
                    raise ValueError(f"the {self.family} chat format has no system turn")
                head += self.system.format(text=text)
            elif role == "user":
                image = self.image if image_pending else ""
                image_pending = False
                head += self.user.format(image=image, text=text)
            elif role == "assistant":
                out.append((head + self.assistant_prefix, False))
                out.append((text + self.assistant_end, True))
                head = self.after_assistant
            else:
                raise ValueError(f"unknown role {role!r}")
        if add_generation_prompt:
            head += self.assistant_prefix
        if head:
            out.append((head, False))
        return out

    def render(self, turns, has_image: bool, add_generation_prompt: bool = False) -> str:
        return "".join(t for t, _ in self.segments(turns, has_image, add_generation_prompt))

    def jinja(self) -> str:
        """The same format as a transformers chat template (messages with string or typed-list content)."""
        def lit(s: str) -> str:
            return "{{ " + repr(s) + " }}"

        def split(tpl: str) -> tuple[str, str, str]:
            before, rest = tpl.split("{image}") if "{image}" in tpl else ("", tpl)
            mid, after = rest.split("{text}")
            return before, mid, after

        u_before, u_mid, u_after = split(self.user)
        parts = [
            "{%- set image_done = namespace(v=false) -%}",
            lit(self.bos) if self.bos else "",
            "{%- for m in messages -%}",
            "{%- if m['content'] is string -%}{%- set text = m['content'] -%}{%- set has_img = false -%}",
            "{%- else -%}{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
            " | join('') -%}{%- set has_img = (m['content'] | selectattr('type', 'equalto', 'image') | list"
            " | length) > 0 -%}{%- endif -%}",
        ]
        if self.system is not None:
            s_before, s_after = self.system.split("{text}")
            if self.default_system:
                parts.append("{%- if loop.first and m['role'] != 'system' -%}" + lit(s_before)
                             + lit(self.default_system) + lit(s_after) + "{%- endif -%}")
            parts.append("{%- if m['role'] == 'system' -%}" + lit(s_before) + "{{ text }}" + lit(s_after)
                         + "{%- endif -%}")
        parts += [
            "{%- if m['role'] == 'user' -%}" + lit(u_before),
            "{%- if has_img and not image_done.v -%}" + lit(self.image)
            + "{%- set image_done.v = true -%}{%- endif -%}",
            lit(u_mid) + "{{ text }}" + lit(u_after),
            "{%- elif m['role'] == 'assistant' -%}" + lit(self.assistant_prefix)
            + "{% generation %}{{ text }}" + lit(self.assistant_end) + "{% endgeneration %}"
            + lit(self.after_assistant),
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}" + lit(self.assistant_prefix) + "{%- endif -%}",
        ]
        return "".join(p for p in parts if p)


_IM = dict(user="<|im_start|>user\n{image}{text}<|im_end|>\n", assistant_prefix="<|im_start|>assistant\n",
           assistant_end="<|im_end|>", after_assistant="\n", system="<|im_start|>system\n{text}<|im_end|>\n")

CHAT_FORMATS: dict[str, ChatFormat] = {
    "qwen2vl": ChatFormat(
        family="qwen2vl", bos="", image="<|vision_start|><|image_pad|><|vision_end|>",
        default_system="You are a helpful assistant.", pad="<|endoftext|>",
        special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                        "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        extra_tokens=("<|im_start|>",), **_IM),
    "qwen2_5vl": ChatFormat(
        family="qwen2_5vl", bos="", image="<|vision_start|><|image_pad|><|vision_end|>",
        default_system="You are a helpful assistant.", pad="<|endoftext|>",
        special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                        "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        extra_tokens=("<|im_start|>",), **_IM),
    "llava_onevision": ChatFormat(
        family="llava_onevision", bos="", image="<image>\n", pad="<|endoftext|>",
        special_tokens={"image_token": "<image>", "video_token": "<video>"},
        extra_tokens=("<|im_start|>",), **_IM),
    "smolvlm": ChatFormat(
        family="smolvlm", bos="<|im_start|>", user="User:{image}{text}<end_of_utterance>\n",
        assistant_prefix="Assistant:", assistant_end="<end_of_utterance>", after_assistant="\n",
        image="<image>", system="System: {text}<end_of_utterance>\n", pad="<|endoftext|>",
        special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                        "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
        extra_tokens=tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))),
    "internvl": ChatFormat(
        family="internvl", bos="", image="<IMG_CONTEXT>\n", pad="<|endoftext|>",
        special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
        extra_tokens=("<|im_start|>",), **_IM),
    "gemma3": ChatFormat(
        family="gemma3", bos="<bos>", user="<start_of_turn>user\n{image}{text}<end_of_turn>\n",
        assistant_prefix="<start_of_turn>model\n", assistant_end="<end_of_turn>", after_assistant="\n",
        image="<start_of_image>", system=None, pad="<pad>",
        special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                        "image_token": "<image_soft_token>"},
        extra_tokens=("<start_of_turn>", "<eos>")),
}
