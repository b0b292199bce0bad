"""harmonize"""
