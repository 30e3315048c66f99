"""The tissue U-Net bundle's recipe (cellseg/models/tissue): synthetic slide views from DSB2018 images, training
through cellseg's training loop, evaluation and the model card. README.md says how to run it."""
