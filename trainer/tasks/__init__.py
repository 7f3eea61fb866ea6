"""Task sets: the miniature benchmark, HumanEval, MBPP / LiveCodeBench loaders."""
