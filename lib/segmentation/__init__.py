"""Semantic segmentation: its losses (Cityscapes class weights, OHEM), whole-image and sliding-window test-time
inference, and confusion-matrix metrics. The task that uses them is ``deqlab.tasks.segmentation``."""
