"""Training: the one SGD loop (:mod:`~marginlab.training.loop`), the loss terms and the recipes that switch
them on, margin tracking and its trends, the training state and its checkpoint, and what a person watches
(progress). May import every layer below it (lab and down); never plots, experiments or commands.
"""
