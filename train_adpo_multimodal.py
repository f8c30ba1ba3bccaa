"""Train with Abductive DPO: ``python train_adpo_multimodal.py --help``. Same as the ``adpo-train`` command."""

from adpo.cli import run

if __name__ == "__main__":
    run()
