"""The ways the tissue prefilter (tissue/finder.py) can find tissue: each method's name and what it does.

Declared apart from tissue/finder.py, which needs numpy, so that the protocol schema and `cellseg count --help` list
them without importing it.
"""

METHODS = {
    "unet": "the shipped tissue U-Net",
    "otsu": "Otsu's threshold on the thumbnail",
    "none": "no prefilter: the whole image is analysed",
}
