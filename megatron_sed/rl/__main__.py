"""python -m megatron_sed.rl (see megatron_sed.rl.cli)."""

from megatron_sed.rl.cli import main

if __name__ == "__main__":
    main()
