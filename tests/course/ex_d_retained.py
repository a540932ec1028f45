# IV.D Gestion du message retenu -- adapted: host/port/credentials from argv.
# 1. publish a retained message on isima/GX, then subscribe: the message comes
#    back flagged as retained;
# 2. delete it with an empty retained publish, subscribe again: nothing comes.
import time

import paho.mqtt.client as mqtt

import common

a = common.args("D: retained", lambda p: p.add_argument("--wait", type=float, default=1.0))
topic = "isima/" + a.gx
messageGX = "retained_" + a.gx

def on_connect(client, userdata, flags, rc):
    print("Connected with result code => "+mqtt.connack_string(rc))

def on_message(client, userdata, msg):
    print("Received message " + str(msg.payload) + " on topic " + msg.topic + " with QoS " +
    str(msg.qos))
    if msg.retain == 1:
        print("This is a retained message")
        # Actions à réaliser si le message est un message retenu

client = mqtt.Client()
client.on_connect = on_connect
client.on_message = on_message
client.username_pw_set(username=a.username, password=a.password)
client.connect(a.host, a.port)
client.loop_start()

(rc, mid) = client.publish(topic=topic, payload=messageGX, retain=True)
time.sleep(0.3)
print("-- subscribing after the retained publish")
client.subscribe(topic)
time.sleep(a.wait)
client.unsubscribe(topic)
time.sleep(0.3)

(rc, mid) = client.publish(topic=topic, payload="", retain=True)
time.sleep(0.3)
print("-- subscribing after the deletion")
client.subscribe(topic)
time.sleep(a.wait)
print("-- done")
client.disconnect()
client.loop_stop()
