"""The transfer-learning study: does a pretrained backbone beat the same model from scratch? (README.md)"""
