"""The usage-guidance instruction of the LI-DiT paper (DESIGN 1.1), defined once.

Torch-free on purpose: the encoder config (`lidit.encoder`) and the starter build (`lidit.starter.config`,
which must import without torch) both take it from here.
"""

DEFAULT_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects:"
)
