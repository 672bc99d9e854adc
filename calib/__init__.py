"""lmcompress.calib"""
