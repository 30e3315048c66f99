"""The default nuclei bundle's recipe (cellseg/models/nuclei): DSB2018 + TNBC, a hold-out of whole acquisition
groups and patients, training, validation and the model card. README.md says how to run it."""
