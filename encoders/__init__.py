"""Encoders: TF Hub handles loaded once per worker, and the pretrained encoders this project bakes offline."""
