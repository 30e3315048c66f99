"""Training recipes of the bundles cellseg ships, for the data they were trained on (DSB2018, TNBC): how to
reproduce them. Not part of the installed package (as torchvision's references/); run from the repository's root,
e.g. `python -m references.nuclei.train_default_bundle --help`. The training code a user's own data needs is in the
package (cellseg.training.maskrcnn and its train_* modules, `cellseg train`)."""
