"""kdstore.cli"""
