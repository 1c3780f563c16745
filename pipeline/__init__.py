"""kdstore.pipeline"""
