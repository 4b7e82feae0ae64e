"""Push a saved model to the Hugging Face Hub: its weights, tokenizer, bertqa.json and model card (README.md).

Examples:
  python scripts/push.py runs/quick/final_model your-name/minilm-squad
  python scripts/push.py runs/quick/final_model your-name/minilm-squad --private --revision v1 --message "8-minute run"
  python scripts/push.py runs/lora/final_model/adapter your-name/minilm-squad-lora   # the adapter alone
  python scripts/push.py runs/quick/onnx-int8 your-name/minilm-squad-onnx --dry-run   # list what would be sent

The repository is made if it does not exist (--private makes a new one private), and everything goes up in one
commit on main or on the --revision branch (made from main if missing). The token comes from where the hub client
finds it: HF_TOKEN, or `hf auth login`. A training run's folder or a checkpoint is refused (push the model it
saved); the card's code is pointed at the repository in what is sent, and the folder itself is not changed.
Without a token, or where the hub cannot be reached, it stops within seconds and says so.
"""

from __future__ import annotations

import argparse

from bertqa.cli import run, script_parser, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("model", help="a saved model folder: runs/NAME/final_model, its adapter/, an exported folder")
    parser.add_argument("repo_id", help="the Hub repository, NAME or ORG/NAME (made if missing)")
    parser.add_flag("--private", help="make a new repository private (an existing one keeps its visibility)")
    parser.add_argument("--revision", help="the branch to push to (default: main; made from main if missing)")
    parser.add_argument("--message", help="the commit message (default: 'Upload MODEL with bertqa')")
    parser.add_flag("--dry-run", help="list the files that would be pushed, and push nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from bertqa.deploy.share import check_repo_id, files_to_push, push_model

    if args.dry_run:
        check_repo_id(args.repo_id)
        files = files_to_push(args.model)
        print(f"would push {len(files)} files of {args.model} to {args.repo_id}:")
        print("\n".join(f"  {name}" for name in files))
        return 0
    pushed = push_model(args.model, args.repo_id, private=args.private, revision=args.revision, message=args.message)
    print(f"pushed {len(pushed.files)} files of {args.model} to {pushed.repo_id} ({pushed.revision}): {pushed.url}")
    return 0


if __name__ == "__main__":
    run(main)
