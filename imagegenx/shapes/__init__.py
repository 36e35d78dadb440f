"""The project's own small text-to-image model: a synthetic captioned data set of
coloured shapes, its renderer, a scorer that checks generated pictures against
their prompts, and the reproducible training script."""
