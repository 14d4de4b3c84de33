"""``python -m fracgpu``: the fracgpu command line."""

from fracgpu.cli import main

if __name__ == "__main__":
    main(prog_name="fracgpu")
