"""kdstore.store"""
