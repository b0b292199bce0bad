"""bids"""
