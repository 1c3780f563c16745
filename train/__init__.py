"""kdstore.train"""
