from .cli import main

if __name__ == "__main__":  # python -m llava_loop (an import, e.g. by doctest collection, runs nothing)
    raise SystemExit(main())
