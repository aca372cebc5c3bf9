"""`llava-jax chat`: talk to a checkpoint in the terminal.

  llava-jax chat --ckpt DIR --image photo.jpg --prompt "What is shown?"   # answer once and exit
  llava-jax chat --ckpt DIR [--image photo.jpg]                           # interactive, multi-turn

Interactive commands: /reset (new conversation, keeps the image), /image PATH (new conversation
about another image), /help; end of input (Ctrl-D) exits. Answers stream as they are generated.
LLaVA-1.6 (AnyRes) checkpoints take images of any aspect ratio (tiled; the prompt grows with the
image); an image they cannot use, or a conversation longer than the context, is reported as an
error line (and the interactive session goes on).
"""
from __future__ import annotations

import argparse
import sys

COMMANDS_HELP = "commands: /reset  /image PATH  /help   (Ctrl-D exits)"


def parse_args(argv):
    from llava_jax.infer.prompting import add_model_arguments

    p = argparse.ArgumentParser(prog="llava-jax chat", description="Chat with a llava-jax checkpoint.")
    p.add_argument("--ckpt", required=True, help="model folder or training workdir")
    p.add_argument("--image", help="image for the first turn")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_model_arguments(p)
    return p.parse_args(argv)


class Session:
    """One conversation: its turns so far and the image of its first turn."""

    def __init__(self, chat_model, image=None):
        self.chat_model = chat_model
        self.image = image
        self.turns = []

    def reset(self, image=None, keep_image=True):
        self.turns = []
        if not keep_image:
            self.image = image

    def ask(self, text: str, options: dict, out) -> str:
        with_image = self.image is not None and not self.turns
        turns = self.turns + [("user", text, with_image)]
        images = [self.image] if self.image is not None else []

        def show(delta):
            out.write(delta)
            out.flush()

        answer = self.chat_model.reply(turns, images, on_text=show, **options)
        out.write("\n")
        out.flush()
        self.turns = turns + [("assistant", answer, False)]
        return answer


def _load_image(path: str):
    from llava_jax.data.image import load_image

    return load_image(path)


def interactive(session: Session, options: dict, stdin, out, err) -> int:
    from llava_jax.infer.prompting import INPUT_ERRORS

    print(COMMANDS_HELP, file=err)
    while True:
        out.write("USER: ")
        out.flush()
        line = stdin.readline()
        if not line:  # EOF
            out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/help":
            print(COMMANDS_HELP, file=err)
            continue
        if line == "/reset":
            session.reset()
            print("(new conversation)", file=err)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=err)
                continue
            try:
                image = _load_image(path)
                session.chat_model.prompts.image(image)  # one AnyRes cannot tile fails now, not at the next question
            except ValueError as e:  # missing, undecodable or unusable: say so and keep chatting
                print(f"error: {e}", file=err)
                continue
            session.reset(image, keep_image=False)
            print(f"(new conversation about {path})", file=err)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {COMMANDS_HELP}", file=err)
            continue
        out.write("ASSISTANT: ")
        out.flush()
        try:
            session.ask(line, options, out)
        except INPUT_ERRORS as e:  # e.g. the conversation outgrew the context: say so, keep the session
            out.write("\n")
            print(f"error: {e}", file=err)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from llava_jax.infer.prompting import INPUT_ERRORS, load_from_args

    image = None
    if args.image:
        try:
            image = _load_image(args.image)
        except ValueError as e:
            print(f"llava-jax chat: error: {e}", file=sys.stderr)
            return 2
    chat_model = load_from_args(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed)
    try:
        if image is not None:
            chat_model.prompts.image(image)  # an image the model cannot take: before any question
        session = Session(chat_model, image)
        if args.prompt is not None:
            session.ask(args.prompt, options, sys.stdout)
            return 0
    except INPUT_ERRORS as e:
        print(f"llava-jax chat: error: {e}", file=sys.stderr)
        return 2
    return interactive(session, options, sys.stdin, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
